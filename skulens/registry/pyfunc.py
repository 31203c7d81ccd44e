"""The encoder as an MLflow pyfunc model: ``mlflow.pyfunc.load_model("models:/<name>@champion")`` loads it and
``predict`` embeds images.

Input: a DataFrame with one column ``image`` of encoded image bytes (JPEG, PNG, WebP, ...). Output: float32
embeddings (N, D), L2-normalised, the same vectors the SKU index holds. The model folder carries the encoder
file (``artifacts/encoder.pt``, the file skulens itself loads and verifies by sha256) and its spec sidecar,
a signature and an input example. This module imports mlflow: import it only where a model is logged or
loaded.
"""

from __future__ import annotations

import io
import os
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc

INPUT_COLUMN = "image"
ENCODER_ARTIFACT = "encoder"


class EncoderModel(mlflow.pyfunc.PythonModel):
    """Embeds encoded images with a skulens encoder (eval transform included)."""

    def load_context(self, context) -> None:
        from skulens.model.io import load_encoder

        self.encoder = load_encoder(context.artifacts[ENCODER_ARTIFACT])

    def predict(self, context, model_input, params=None):
        from PIL import Image

        from skulens.data.images import to_rgb
        from skulens.model.embed import embed_images

        column = model_input[INPUT_COLUMN] if hasattr(model_input, "columns") else model_input
        images = [to_rgb(Image.open(io.BytesIO(bytes(b)))) for b in column]
        return embed_images(self.encoder, images)


def _example_image() -> bytes:
    """A small JPEG for the input example (a grey packshot-sized tile)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 120, 110)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _requirements() -> list[str]:
    """Pinned from what is installed (no requirement inference: it would run the model in a subprocess)."""
    out = []
    for dist in ("skulens", "torch", "torchvision", "open_clip_torch", "timm", "pillow", "numpy", "pandas", "mlflow"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def save_pyfunc(encoder_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir`` as an MLflow pyfunc model around ``encoder_path``, with a signature and an input example
    computed by the model itself. Returns ``out_dir``."""
    import pandas as pd
    from mlflow.models import infer_signature

    from skulens.model.io import load_encoder

    encoder_path = Path(encoder_path)
    artifacts = {ENCODER_ARTIFACT: str(encoder_path)}
    sidecar = encoder_path.with_name(encoder_path.name + ".json")
    if sidecar.is_file():
        artifacts["spec"] = str(sidecar)
    example = pd.DataFrame({INPUT_COLUMN: [_example_image()]})
    model = EncoderModel()
    model.encoder = load_encoder(encoder_path)
    signature = infer_signature(example, model.predict(None, example))
    code = Path(__file__).with_name("pyfunc_model.py")  # models from code: nothing pickled
    mlflow.pyfunc.save_model(path=str(out_dir), python_model=str(code), artifacts=artifacts,
                             signature=signature, input_example=example, pip_requirements=_requirements())
    return Path(out_dir)
