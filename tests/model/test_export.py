"""ONNX export of the tiny encoder: parity with PyTorch in onnxruntime, dynamic batch axis."""

from __future__ import annotations

import numpy as np
import pytest


def test_export_onnx_parity_and_dynamic_batch(tmp_path):
    import onnxruntime as ort
    import torch

    from skulens.model import ModelSpec, create_encoder
    from skulens.model.export import export_onnx

    torch.manual_seed(0)
    enc = create_encoder(ModelSpec(name="tiny-test"), device="cpu")
    enc.train()
    info = export_onnx(enc, tmp_path / "enc.onnx", opset=17)
    assert enc.training  # caller's mode restored
    assert info["parity_ok"] and info["max_abs_diff"] < 1e-4 and info["max_cos_diff"] < 1e-6
    assert info["opset"] == 17 and info["embed_dim"] == enc.embed_dim == 64
    assert info["input_shape"] == ["batch", 3, enc.image_size, enc.image_size]
    assert (tmp_path / "enc.onnx").stat().st_size == info["size_bytes"] > 0
    assert not list(tmp_path.glob(".*tmp*"))

    sess = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and not isinstance(inp.shape[0], int)  # symbolic batch dimension
    x = torch.randn(5, 3, enc.image_size, enc.image_size)
    enc.eval()
    with torch.inference_mode():
        ref = enc(x).numpy()
    got = sess.run(["embedding"], {"image": x.numpy()})[0]
    assert got.shape == (5, 64)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_export_onnx_refuses_on_parity_failure(tmp_path):
    from skulens.model import ModelSpec, create_encoder
    from skulens.model.export import OnnxParityError, export_onnx

    enc = create_encoder(ModelSpec(name="tiny-test"), device="cpu")
    with pytest.raises(OnnxParityError):
        export_onnx(enc, tmp_path / "strict.onnx", atol=-1.0)  # no output passes a negative tolerance
    assert not (tmp_path / "strict.onnx").exists() and not list(tmp_path.iterdir())  # nothing half-written
