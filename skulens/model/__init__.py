"""Image encoders for SKU recognition (open_clip image towers), one concern per module:

* :mod:`.factory`   - ``ModelSpec``, ``Encoder``, ``create_encoder``
* :mod:`.io`        - ``save_encoder``, ``load_encoder``
* :mod:`.transform` - eval transform and shelf-condition train augmentation
* :mod:`.lr`        - block-wise LR decay param groups
* :mod:`.loss`      - ArcFace loss and its param group

Importing this package does not import torch; ``Encoder`` is built on first access.
"""

from .factory import DEFAULT_MODEL, ModelSpec, create_encoder
from .io import load_encoder, save_encoder

__all__ = ["DEFAULT_MODEL", "Encoder", "ModelSpec", "create_encoder", "load_encoder", "save_encoder"]


def __getattr__(name: str):
    if name == "Encoder":
        from .factory import _encoder_class

        return _encoder_class()
    raise AttributeError(name)
