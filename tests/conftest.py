"""Shared fixtures: tiny models and throwaway run folders, small enough for 2 CPU cores."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The suite's models are tiny: one intra-op thread is 2-10x faster than two on a 2-core
    machine (thread hand-offs dominate such small convolutions), and results are reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model():
    """Factory for a small seeded LipConvnet (``lipconvnet5`` at width 4 by default, ~260k
    parameters); keyword arguments go to ``create_model``."""
    from certify.models import create_model

    def make(name: str = "lipconvnet5", seed: int = 0, **kwargs):
        kwargs.setdefault("width", 4)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return create_model(name, **kwargs)

    return make


@pytest.fixture
def run_dir(tmp_path):
    """A path for a training run folder that does not exist yet."""
    return tmp_path / "run"


@pytest.fixture(scope="session")
def bench_script():
    """Loads a script of bench/ as a module (bench/ is not a package), registered under its name
    so that dataclasses and pickling inside it work."""
    import importlib.util
    import sys
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        if getattr(sys.modules.get(name), "__file__", None) == str(path):
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load
