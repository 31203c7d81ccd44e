"""Save and load encoders: one ``.pt`` file holding the resolved spec and the tower's state_dict.

The file contains only plain Python types and tensors, so it loads with
``torch.load(..., weights_only=True)``. A ``<path>.json`` with the spec is written next to it for
humans and tools that do not want to open the checkpoint. Writes are atomic (tmp file +
``os.replace``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .factory import ModelSpec, create_encoder

__all__ = ["FORMAT", "load_encoder", "save_encoder"]

FORMAT = "skulens-encoder/1"


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_encoder(encoder, path: str | os.PathLike) -> Path:
    """Write ``encoder`` (spec + state_dict, tensors moved to CPU) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = encoder.spec.to_dict()
    state = {k: v.detach().cpu() for k, v in encoder.model.state_dict().items()}
    _atomic_torch_save({"format": FORMAT, "spec": spec, "state_dict": state}, path)
    side = path.with_name(path.name + ".json")
    tmp = side.with_name(f".{side.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "spec": spec}, indent=2, sort_keys=True))
    os.replace(tmp, side)
    return path


def load_encoder(path: str | os.PathLike, device: str = "cpu"):
    """Load an encoder written by :func:`save_encoder`. Builds the architecture from the stored spec
    without pretrained weights (nothing is downloaded), then loads the stored weights strictly.
    Returned in eval mode on ``device``."""
    import torch

    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a skulens encoder file (format {FORMAT!r} expected)")
    spec = ModelSpec.from_dict(blob["spec"])
    encoder = create_encoder(spec, device="cpu", load_weights=False)
    encoder.model.load_state_dict(blob["state_dict"], strict=True)
    return encoder.to(device).eval()
