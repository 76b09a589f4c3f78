"""lipcert's model registry and architecture families, installed as ``certify.models``."""

from ._registry import create_model, is_model, list_models, model_facts, register_model
from . import lipconvnet  # noqa: F401  (registers the LipConvnet family)
from .lipconvnet import LipConvNet

__all__ = ["LipConvNet", "create_model", "is_model", "list_models", "model_facts", "register_model"]
