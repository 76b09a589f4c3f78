"""Checkpoints written before the layers package (issue 15) load and give the very same numbers.

tests/data/pre_layers/ holds three training checkpoints (every head, activation and pooling) and
two baked ones and two ONNX exports, saved by lipcert at commit f16f06b, with the logits, bounds, per-layer bounds and
certificates that code computed (tests/data/make_pre_layers_reference.py). Today's code must
reproduce them: a refactoring of the layers may not move a certificate.

Not bit for bit: the reference was computed on an Intel CPU, and float32 convolutions (oneDNN picks
its kernels per instruction set) round differently on other CPUs, so the old code itself moves by a
few float32 ulps there (measured on an AMD EPYC: logits 2e-6, fast-path bounds 3e-8 relative, since
they bound the float32 kernels computed). So the bounds are compared to 3e-7 relative: ten times the
cross-CPU spread, and seven times tighter than the gap between the fast and the Taylor path of the
same checkpoint (2e-6), so a change of terms, norm or layer order fails. Logits, margins and radii
are compared to 1e-5 (float32 rounding through ~10 layers); predictions exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

LOGITS_ATOL = 1e-5  # float32 logits of magnitude ~3 after ~10 layers
BOUND_RTOL = 3e-7  # float64 bounds; fast-path bounds are of float32 kernels (~3e-8 apart across CPUs)


def close_bound(got: float, want: str) -> bool:
    return abs(got - float(want)) <= BOUND_RTOL * abs(float(want))

DATA = Path(__file__).resolve().parent / "data" / "pre_layers"
REF = json.loads((DATA / "reference.json").read_text())


@pytest.fixture(scope="module")
def tensors():
    from safetensors.torch import load_file

    return load_file(str(DATA / "reference.safetensors"))


@pytest.mark.parametrize("entry", sorted(REF["models"]))
def test_old_checkpoint_gives_the_same_logits_bounds_and_certificates(entry, tensors):
    from certify.certificates import Certifier
    from certify.loading import load_any
    from certify.layers import set_eval_mode

    ref = REF["models"][entry]
    fkey, path_kind = entry.split("/")
    if path_kind == "onnx":
        pytest.importorskip("onnxruntime")
    model = load_any(DATA / ref["file"])
    if path_kind in ("taylor", "fast") and not fkey.endswith("baked"):
        set_eval_mode(model, path_kind, images=8 if path_kind == "fast" else None)
    x = tensors["inputs"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), tensors[f"{entry}/logits"], rtol=0, atol=LOGITS_ATOL)
    if "lipschitz_bound" in ref:
        assert close_bound(model.lipschitz_bound(), ref["lipschitz_bound"])
    else:
        assert close_bound(model.feature_lipschitz_bound(), ref["feature_lipschitz_bound"])
    got = [(b.name, b.bound) for b in model.layer_bounds()]
    assert [name for name, _ in got] == [name for name, _, _ in ref["layer_bounds"]]
    for (name, bound), (_, _, want) in zip(got, ref["layer_bounds"]):
        assert close_bound(bound, want), (name, bound, want)
    cert = Certifier(model)
    assert cert.method == ref["method"]
    _, pred, margin, radius = cert(x, thresholds=[36 / 255])
    assert torch.equal(pred, tensors[f"{entry}/pred"])
    torch.testing.assert_close(margin, tensors[f"{entry}/margin"], rtol=0, atol=LOGITS_ATOL)
    torch.testing.assert_close(radius, tensors[f"{entry}/radius"], rtol=0, atol=LOGITS_ATOL)
