"""Writes tests/data/pre_layers/: checkpoints saved by lipcert BEFORE the layers package (issue 15)
and what that code computed from them (logits, bounds, per-layer bounds, certificates).

Run once, at commit f16f06b (the last commit before certify/layers/), with one torch thread:

    OMP_NUM_THREADS=1 .venv/bin/python tests/data/make_pre_layers_reference.py

tests/test_pre_layers_checkpoints.py loads the files with today's code and requires the very same
numbers, bit for bit. Do not re-run it on later code: the point is that the numbers come from the
old code. (Kept to document how the fixture was made.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "pre_layers"

#: name -> (registry name, kwargs): every head, every activation and pooling, both strides.
MODELS = {
    "ortho": ("lipconvnet5", dict(width=2, head="ortho", activation="hh1", pooling="max")),
    "lln": ("lipconvnet5", dict(width=2, head="lln", activation="hh2", pooling="lip")),
    "mlp": ("lipconvnet5_mlp", dict(width=2, activation="maxmin", mlp_hidden=16)),
}


def perturbed(name: str, kwargs: dict, seed: int):
    """A model whose weights are not an initialisation: seeded noise on every parameter, then two
    training forwards (power iteration moves the norm-estimate buffers)."""
    from certify.models import create_model

    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.detach().abs().mean().clamp_min(0.05))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, *model.input_shape))
    return model.eval()


def main() -> None:
    from certify.baked import bake, save_baked
    from certify.certificates import Certifier
    from certify.checkpoint import load, save
    from certify.soc import set_eval_mode

    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(123)
    x = torch.rand(8, 3, 32, 32, generator=gen)
    tensors = {"inputs": x}
    ref: dict = {"made_at": "f16f06b", "models": {}}
    for i, (key, (name, kwargs)) in enumerate(MODELS.items()):
        path = OUT / f"{key}.safetensors"
        save(path, perturbed(name, kwargs, seed=i), class_names=[f"c{j}" for j in range(10)])
        files = [(key, path)]
        if key != "mlp":
            baked_path = OUT / f"{key}_baked.safetensors"
            save_baked(baked_path, bake(load(path)))
            files.append((f"{key}_baked", baked_path))
        for fkey, fpath in files:
            for path_kind in ("taylor", "fast"):
                model = load(fpath)
                if not fkey.endswith("baked"):
                    set_eval_mode(model, path_kind, images=8 if path_kind == "fast" else None)
                elif path_kind == "fast":
                    continue  # a baked model has one evaluation path
                entry = f"{fkey}/{path_kind}"
                with torch.no_grad():
                    tensors[f"{entry}/logits"] = model(x)
                if key == "mlp":
                    bounds = {"feature_lipschitz_bound": repr(model.feature_lipschitz_bound())}
                else:
                    bounds = {"lipschitz_bound": repr(model.lipschitz_bound())}
                bounds["layer_bounds"] = [[b.name, b.kind, repr(b.bound)] for b in model.layer_bounds()]
                cert = Certifier(model)
                logits, pred, margin, radius = cert(x, thresholds=[36 / 255])
                tensors[f"{entry}/pred"], tensors[f"{entry}/radius"] = pred, radius
                tensors[f"{entry}/margin"] = margin
                bounds["method"] = cert.method
                ref["models"][entry] = {"file": fpath.name, **bounds}
    from certify.checkpoint import load_any
    from certify.export import export_onnx

    for key in ("ortho", "lln"):  # ONNX exports: the verified graph's own bound
        out = OUT / f"{key}.onnx"
        export_onnx(load(OUT / f"{key}.safetensors"), out)
        model = load_any(out)
        entry = f"{key}_onnx/onnx"
        tensors[f"{entry}/logits"] = model(x)
        cert = Certifier(model)
        _, pred, margin, radius = cert(x, thresholds=[36 / 255])
        tensors[f"{entry}/pred"], tensors[f"{entry}/margin"], tensors[f"{entry}/radius"] = pred, margin, radius
        ref["models"][entry] = {"file": out.name, "lipschitz_bound": repr(model.lipschitz_bound()),
                                "method": cert.method,
                                "layer_bounds": [[b.name, b.kind, repr(b.bound)] for b in model.layer_bounds()]}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
