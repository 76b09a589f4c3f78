"""1-Lipschitz layers, one file per layer family, and the shared tools that bound them soundly.

- :mod:`.protocol`: what every layer implements (:class:`LipschitzLayer`, :class:`Head`) and the
  model-level operations built on it (:func:`set_eval_mode`, weight decay, after-epoch refresh);
- :mod:`.registry`: every layer type by name (:func:`register_layer`, :func:`make_layer`,
  ``lipcert layers``);
- :mod:`.norms`: sound float64 operator-norm bounds (dense matrices, convolutions);
- the families: :mod:`.soc` (with :mod:`.expm`), :mod:`.activations`, :mod:`.pooling`,
  :mod:`.heads`, :mod:`.mlp_head`, :mod:`.normalize`.

See docs/adding-a-layer.md for how to add a layer type.
"""

from .protocol import Head, LipschitzLayer, set_eval_mode
from .registry import all_layers, layer_class, layer_info, list_layers, make_layer, register_layer

__all__ = ["Head", "LipschitzLayer", "all_layers", "layer_class", "layer_info", "list_layers", "make_layer",
           "register_layer", "set_eval_mode"]
