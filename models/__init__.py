"""lipcert's model registry and architecture families, installed as ``certify.models``."""

from ._registry import create_model, is_model, list_models, model_facts, register_model
from . import convnet, liresnet, lipconvnet  # noqa: F401  (register the ConvNet, LiResNet and LipConvnet families)
from .lipconvnet import LipConvNet

__all__ = ["LipConvNet", "create_model", "is_model", "list_models", "model_facts", "register_model"]
