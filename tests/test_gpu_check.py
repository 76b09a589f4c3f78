"""bench/gpu_check.py: its gate, its TF32 handling, its exit codes, and a tiny CPU dry run."""

from __future__ import annotations


import pytest
import torch

from certify.numerics import reduced_precision_state



@pytest.fixture(scope="module")
def gc(bench_script):
    return bench_script("gpu_check")


def _cert(radius, bound=4.0):
    radius = torch.tensor(radius, dtype=torch.float64)
    return dict(logits=torch.zeros(len(radius), 3, dtype=torch.float64), margin=radius.clone(), radius=radius,
                pred=torch.zeros(len(radius), dtype=torch.long), bound=bound)


def test_gate_flags_a_radius_above_the_tolerance_and_only_that(gc):
    ref = _cert([0.0, 0.3, 1.0])
    allowed = gc.allowed_radius(ref["radius"])
    slack = allowed - ref["radius"]
    assert float(slack.min()) > 0  # float32 rounding is absorbed ...
    within = gc.compare(_cert((ref["radius"] + 0.5 * slack).tolist()), ref)
    assert within["over"] == 0 and not within["bound_low"]
    assert gc.fmt_row("x", within, gated=True).endswith("ok")
    over = gc.compare(_cert((ref["radius"] + 2 * slack).tolist()), ref)  # ... a larger radius is not
    assert over["over"] == 3
    assert gc.fmt_row("x", over, gated=True).endswith("FAIL")
    assert gc.fmt_row("x", over, gated=False).endswith("(info, not gated)")
    # smaller device radii are always fine; a smaller device bound inflates radii: flagged
    assert gc.compare(_cert([0.0, 0.1, 0.5]), ref)["over"] == 0
    low = gc.compare(_cert([0.0, 0.3, 1.0], bound=4.0 * (1 - 2 * gc.RADIUS_RTOL)), ref)
    assert low["bound_low"] and gc.fmt_row("x", low, gated=True).endswith("FAIL")


def test_tf32_on_sets_tf32_and_restores_the_settings(gc):
    before = reduced_precision_state()
    with gc.tf32_on(gc.TF32_ALL):
        inside = reduced_precision_state()
        assert torch.get_float32_matmul_precision() == "high"
        if "cudnn.conv" in inside:  # torch >= 2.9
            assert inside["cudnn.conv"] == inside["cuda.matmul"] == "tf32"
        else:
            assert inside["cudnn.allow_tf32"] and inside["cuda.matmul.allow_tf32"]
    assert reduced_precision_state() == before


def test_emulated_tf32_keeps_ten_mantissa_bits(gc):
    x = torch.tensor([1 + 2.0**-12, 1 + 3 * 2.0**-11, -(1 + 2.0**-12), 3.0], dtype=torch.float32)
    assert gc._round_tf32(x).tolist() == [1.0, 1 + 2 * 2.0**-10, -1.0, 3.0]
    assert torch.equal(gc._round_tf32(x.double()), x.double())  # TF32 only concerns float32
    w = torch.full((1, 1, 1, 1), 1 + 2.0**-12)
    with gc.EmulatedTF32():
        y = torch.nn.functional.conv2d(torch.ones(1, 1, 2, 2), w)
    assert torch.equal(y, torch.ones(1, 1, 2, 2))  # the operand was rounded before the product


def test_no_cuda_device_exits_4(gc, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--device", "cuda"]) == gc.EXIT_NO_CUDA == 4
    assert "no CUDA device" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gc.main(["--device", "cuda:3"]) == 4
    assert "no CUDA device cuda:3" in capsys.readouterr().err


def test_usage_errors_exit_2(gc):
    for argv in (["--device", "tpu"], ["--heads", "conv"], ["--eval", "exact"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            gc.main(argv)
        assert e.value.code == 2


def test_a_failed_check_exits_3(gc, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gc, "check_head", lambda *a: ["ortho/fast/ieee: 1 radii over the tolerance"])
    assert gc.main(["--device", "cpu", "--heads", "ortho", "--output", str(tmp_path / "r.txt")]) == 3
    report = (tmp_path / "r.txt").read_text()
    assert "FAIL ortho/fast/ieee" in report and report.rstrip().endswith("RESULT: FAIL")


# ~10 s on one core (training one step, certifying 8 images 5 times): the one test that runs the
# script end to end, so it stays in the default suite.
def test_cpu_dry_run_passes_and_reports_every_row(gc, tmp_path):
    out = tmp_path / "report.txt"
    argv = ["--device", "cpu", "--steps", "1", "--images", "8", "--batch-size", "8", "--width", "4",
            "--heads", "lln", "--eval", "fast", "--output", str(out)]
    before = reduced_precision_state()
    assert gc.main(argv) == 0
    assert reduced_precision_state() == before
    report = out.read_text()
    for row in ("cpu float32 vs float64", "ieee (device vs cpu)", "user-tf32 (device vs cpu)",
                "user TF32 restored        ok", "tf32-conv", "tf32-all", "tf32-emulated", "RESULT: PASS"):
        assert row in report, row
