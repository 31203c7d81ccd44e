"""Export an encoder to ONNX (dynamic batch axis) and check parity against PyTorch with onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path


class OnnxParityError(RuntimeError):
    """onnxruntime output differs from PyTorch beyond the tolerance."""


def export_onnx(
    encoder,
    path: str | os.PathLike,
    opset: int = 17,
    atol: float = 1e-4,
    parity_batch: int = 3,
    seed: int = 0,
    check: bool = True,
) -> dict:
    """Export ``encoder`` (input ``image`` (B, 3, H, W) float32 -> output ``embedding`` (B, D),
    unnormalised like ``Encoder.forward``) to ``path`` with a dynamic batch axis.

    The graph is traced with batch 2 and checked on a random batch of ``parity_batch`` (a different
    size, which also proves the batch axis is dynamic) with onnxruntime on the CPU. Returns
    ``{path, opset, input_shape, embed_dim, max_abs_diff, max_cos_diff, parity_ok, size_bytes}``;
    raises :class:`OnnxParityError` if ``max_abs_diff > atol``. The file is written atomically.
    ``check=False`` skips the onnxruntime check (:mod:`skulens.model.engine` checks every backend
    against its own stored PyTorch reference); the diff fields are then None.
    """
    import numpy as np
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = int(getattr(encoder, "image_size", None) or getattr(getattr(encoder, "spec", None), "image_size", 224))
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    cpu_encoder = encoder.to("cpu")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        example = torch.zeros(2, 3, size, size)
        kwargs = {
            "input_names": ["image"], "output_names": ["embedding"],
            "dynamic_axes": {"image": {0: "batch"}, "embedding": {0: "batch"}},
            "opset_version": opset, "do_constant_folding": True,
        }
        with torch.no_grad():
            try:  # TorchScript exporter: no onnxscript dependency, stable for CNN/ViT towers
                torch.onnx.export(cpu_encoder, (example,), str(tmp), dynamo=False, **kwargs)
            except TypeError:  # torch without the ``dynamo`` argument
                torch.onnx.export(cpu_encoder, (example,), str(tmp), **kwargs)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        if not check:
            os.replace(tmp, path)
            return {"path": str(path), "opset": int(opset), "input_shape": ["batch", 3, size, size],
                    "embed_dim": None, "max_abs_diff": None, "max_cos_diff": None, "parity_ok": None,
                    "parity_batch": 0, "size_bytes": path.stat().st_size}

        import onnxruntime as ort  # only for the check: check=False (OpenVINO's export) works without it

        g = torch.Generator().manual_seed(seed)
        x = torch.randn(parity_batch, 3, size, size, generator=g)
        with torch.inference_mode():
            ref = cpu_encoder(x).float().numpy()
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = sess.run(["embedding"], {"image": x.numpy()})[0]
        if got.shape != ref.shape:
            raise OnnxParityError(f"onnx output shape {got.shape} != torch {ref.shape}")
        max_abs = float(np.max(np.abs(got - ref)))

        def _n(a):
            return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

        max_cos = float(np.max(1.0 - np.sum(_n(got) * _n(ref), axis=1)))
        ok = bool(max_abs <= atol)
        if not ok:
            raise OnnxParityError(f"ONNX parity failed: max |diff| {max_abs:.3g} > atol {atol}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        encoder.to(device)
        encoder.train(was_training)
    return {
        "path": str(path), "opset": int(opset), "input_shape": ["batch", 3, size, size],
        "embed_dim": int(ref.shape[1]), "max_abs_diff": max_abs, "max_cos_diff": max_cos,
        "parity_ok": ok, "parity_batch": int(parity_batch), "size_bytes": path.stat().st_size,
    }








# ====================================================================== ONNX
def export_champion_onnx(store, work_dir: str | os.PathLike,
                         opset: int = 17, atol: float = 1e-4, artifact_path: str = "onnx") -> dict:
    """Export the champion encoder to ONNX (parity-checked with onnxruntime) and log the file to the
    champion version's MLflow run under ``artifact_path/`` (once per version: an existing file is
    never replaced). Returns the export info plus ``version``, ``run_id``, ``artifact_uri``, ``uploaded``."""
    from mlflow import MlflowClient

    from skulens.model.export import export_onnx

    work_dir = Path(work_dir)
    model_name = store.model_name
    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    ref = store.champion()
    if ref is None:
        raise LookupError(f"registered model {model_name!r} has no 'champion' alias")
    version, run_id = ref.version, ref.run_id
    encoder = store.encoder(ref, device="cpu")
    name = f"encoder-v{version}.onnx"
    info = export_onnx(encoder, work_dir / "onnx" / name, opset=opset, atol=atol)
    existing = {Path(f.path).name for f in client.list_artifacts(run_id, artifact_path)}
    uploaded = name not in existing
    if uploaded:
        client.log_artifact(run_id, info["path"], artifact_path)
    client.set_model_version_tag(model_name, version, "onnx.max_abs_diff", f"{info['max_abs_diff']:.3g}")
    artifact_uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}/{name}"
    return {**info, "version": version, "run_id": run_id, "artifact_uri": artifact_uri, "uploaded": uploaded}
