"""Checkpoints written before the layers package (issue 15) load and give the very same numbers.

tests/data/pre_layers/ holds three training checkpoints (every head, activation and pooling) and
two baked ones and two ONNX exports, saved by lipcert at commit f16f06b, with the logits, bounds, per-layer bounds and
certificates that code computed (tests/data/make_pre_layers_reference.py). Today's code must
reproduce them bit for bit: a refactoring of the layers may not move a certificate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data" / "pre_layers"
REF = json.loads((DATA / "reference.json").read_text())


@pytest.fixture(scope="module")
def tensors():
    from safetensors.torch import load_file

    return load_file(str(DATA / "reference.safetensors"))


@pytest.mark.parametrize("entry", sorted(REF["models"]))
def test_old_checkpoint_gives_identical_logits_bounds_and_certificates(entry, tensors):
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
        assert torch.equal(model(x), tensors[f"{entry}/logits"])
    if "lipschitz_bound" in ref:
        assert repr(model.lipschitz_bound()) == ref["lipschitz_bound"]
    else:
        assert repr(model.feature_lipschitz_bound()) == ref["feature_lipschitz_bound"]
    got = [[b.name, repr(b.bound)] for b in model.layer_bounds()]
    assert got == [[name, bound] for name, _, bound in ref["layer_bounds"]]
    cert = Certifier(model)
    assert cert.method == ref["method"]
    _, pred, margin, radius = cert(x, thresholds=[36 / 255])
    assert torch.equal(pred, tensors[f"{entry}/pred"])
    assert torch.equal(margin, tensors[f"{entry}/margin"])
    assert torch.equal(radius, tensors[f"{entry}/radius"])
