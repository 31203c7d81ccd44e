"""One inference engine per model version: the encoder compiled once for the fastest runtime that
reproduces PyTorch, cached next to the model file, loaded without torch afterwards.

Backends (``backend=``):

* ``openvino``    - OpenVINO on the CPU (IR converted from the ONNX export, ``PERFORMANCE_HINT``
  ``THROUGHPUT``, one infer request per stream, the batch dealt out to them in chunks of
  ``SKULENS_OPENVINO_CHUNK`` = 8 rows; FP32 by default). Its input is the uint8 NHWC pixels: the
  float conversion, mean/std normalisation and layout change are fused into the compiled graph
  (``openvino.preprocess.PrePostProcessor``); a float32 NCHW batch is also accepted (a second
  compile, on first use, parity-checked then). ``SKULENS_OPENVINO_STREAMS`` / ``_THREADS`` override
  ``NUM_STREAMS`` / ``INFERENCE_NUM_THREADS``;
* ``onnxruntime`` - onnxruntime on the CPU (one intra-op thread per core; uint8 input normalised in numpy);
* ``torch``       - PyTorch (``channels_last``), on CUDA when ``device`` is a CUDA device (uint8 input
  normalised on the device);
* ``auto``        - CUDA: ``torch``; CPU: the first of ``openvino``, ``onnxruntime``, ``torch`` that is
  installed, compiles and passes the parity check (each one skipped is recorded with why, in
  ``engine.fallbacks``). Measured on the 2-core machine, batch 64, EfficientNet-Lite0 at 224 px:
  OpenVINO ~200 images/s, onnxruntime ~105, PyTorch eager ~22 (bench/bench_embed.py).

Cache, next to the model file ``<model>`` (for the :class:`~skulens.registry.store.ModelStore`, the
blob directory of its sha256)::

    <model>.engine/engine.json       spec, per-backend compile/parity record, runtime versions
    <model>.engine/reference.npz     a fixed random batch and PyTorch's (CPU, FP32) output for it
    <model>.engine/model.onnx        the ONNX export (dynamic batch)
    <model>.engine/openvino/         model.xml + model.bin (FP32 IR)
    <model>.engine/ov_cache/         OpenVINO's compiled-blob cache (CACHE_DIR)

Preprocessing (``preprocess=`` / ``$SKULENS_PREPROCESS``): ``engine.preprocess`` turns a PIL image into
the uint8 ``(S, S, 3)`` pixels; ``exact`` reproduces torchvision's resize + centre crop, ``fast`` (the
default) resizes the crop box in one step and lets large JPEGs decode at reduced scale (see
:class:`~skulens.model.transform.EvalTransformNP`; measured on GroZi-120: 1-NN top-1 0.5969 exact vs
0.5973 fast, mean cosine 0.9999). The mode is in ``engine.info()``, the index meta and the embedding
cache key.

Parity: at compile time PyTorch embeds ``reference.npz``'s uint8 batch (normalised) on the CPU and
every backend must reproduce it from the uint8 batch (``max |engine - torch|`` <= ``atol`` and
``max (1 - cosine)`` <= ``cos_tol``). A process that finds the artifact cached re-checks it against the stored reference (milliseconds,
no torch), so a runtime upgrade that changes the numbers is caught, not trusted. The result is
``engine.parity``.

Importing this module imports neither torch nor a runtime; with the artifact cached, an
``openvino``/``onnxruntime`` engine never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .factory import ModelSpec
from .transform import PREPROCESS_MODES, eval_transform_np, preprocess_setting

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "CHOICES", "ENV_BACKEND", "PREPROCESS_MODES", "EngineError", "InferenceEngine", "backend_setting",
           "engine_dir", "get_engine", "load_engine", "parity_stats"]

BACKENDS = ("openvino", "onnxruntime", "torch")
CHOICES = ("auto", *BACKENDS)
#: the environment variable that sets the default backend (``auto`` when unset)
ENV_BACKEND = "SKULENS_INFERENCE_BACKEND"
FORMAT = "skulens-engine/1"
PARITY_BATCH = 4
#: (atol, cos_tol) per precision: FP32 runtimes measure ~1e-5 / 1e-7 on EfficientNet-Lite0; BF16
#: (opt-in, ~2.5x faster on AMX CPUs) ~0.1 / 5e-4
TOLERANCE = {"f32": (1e-3, 1e-5), "bf16": (0.25, 2e-3)}


class EngineError(RuntimeError):
    """No backend could be had (not installed, failed to compile, or failed the parity check)."""


def backend_setting(value: str | None = None) -> str:
    """``value``, else ``$SKULENS_INFERENCE_BACKEND``, else ``auto``; checked against :data:`CHOICES`."""
    b = (value or os.environ.get(ENV_BACKEND) or "auto").strip().lower()
    if b not in CHOICES:
        raise ValueError(f"inference backend {b!r}: one of {', '.join(CHOICES)} ({ENV_BACKEND})")
    return b


def engine_dir(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + ".engine")


def source_of(model_path: str | os.PathLike) -> dict | None:
    """What identifies the model file an engine directory was compiled from: its size and mtime (ns).
    A file rewritten at the same path (a re-run training folder, a copied-over download) changes it,
    so a stale engine is never served for new weights. None when the file does not exist."""
    try:
        st = Path(model_path).stat()
    except OSError:
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def parity_stats(got: np.ndarray, ref: np.ndarray) -> dict:
    """``max_abs_diff`` and ``max_cos_diff`` (max over rows of 1 - cosine) of two (B, D) arrays."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return {"max_abs_diff": float("inf"), "max_cos_diff": float("inf"),
                "error": f"shape {got.shape} != {ref.shape}"}
    n = np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1)
    cos = np.sum(got * ref, axis=1) / np.maximum(n, 1e-12)
    return {"max_abs_diff": float(np.max(np.abs(got - ref))) if got.size else 0.0,
            "max_cos_diff": float(np.max(1.0 - cos)) if len(cos) else 0.0,
            "ref_max_abs": float(np.max(np.abs(ref))) if ref.size else 0.0}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("openvino", "onnxruntime", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _available(backend: str) -> str | None:
    """None if ``backend``'s runtime can be imported, else why not."""
    import importlib.util

    return None if importlib.util.find_spec(backend) is not None else f"{backend} is not installed"


# ====================================================================== runners
def _ov_uint8_model(model, mean, std):
    """``model`` (float32 NCHW input) with OpenVINO preprocessing fused in front of it: uint8 NHWC in,
    converted to float, normalised (``(x - 255 mean) / (255 std)``) and transposed inside the graph."""
    from openvino import Layout, Type
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    inp = ppp.input(0)
    inp.tensor().set_element_type(Type.u8).set_layout(Layout("NHWC"))
    inp.model().set_layout(Layout("NCHW"))
    inp.preprocess().convert_element_type(Type.f32).mean([255.0 * float(m) for m in mean]) \
        .scale([255.0 * float(s) for s in std])
    return ppp.build()


#: rows per OpenVINO infer request: a batch is dealt out in chunks of this size to the free requests
#: (measured on 2 cores, Lite0: chunks of 8 cost no more CPU per image than halves of a 64 batch)
OV_CHUNK = int(os.environ.get("SKULENS_OPENVINO_CHUNK", "8"))


class _OpenVINORunner:
    """The IR compiled twice over: with the uint8 NHWC input and the normalisation fused in (what
    embedding feeds it: :meth:`run_uint8`), and, on first use only, as is (float32 NCHW: :meth:`run_float`)."""

    def __init__(self, xml: Path, cache_dir: Path, precision: str = "f32", hint: str = "THROUGHPUT",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), config: dict | None = None):
        import openvino as ov

        self.core = ov.Core()
        self.xml = xml
        cfg = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision, **(config or {})}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            cfg["CACHE_DIR"] = str(cache_dir)
        except OSError:  # a read-only cache: compile without the blob cache
            pass
        self.cfg = cfg
        model = self.core.read_model(str(xml))
        self.uint8 = self._compile(_ov_uint8_model(model, mean, std))
        self._float = None
        self._float_check: Callable | None = None
        self.lock = threading.Lock()
        self._float_lock = threading.Lock()
        self.info = {"device": "CPU", "hint": hint, "precision": precision, "infer_requests": self.uint8[1],
                     "chunk": OV_CHUNK,
                     "input": "uint8 NHWC (normalisation fused)",
                     **{k.lower(): v for k, v in (config or {}).items()}}

    def _compile(self, model):
        compiled = self.core.compile_model(model, "CPU", self.cfg)
        n = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        dim = int(compiled.output(0).get_partial_shape()[1].get_length())
        return compiled, n, [compiled.create_infer_request() for _ in range(n)], dim

    def _infer(self, compiled, x: np.ndarray) -> np.ndarray:
        """``x`` in chunks of :data:`OV_CHUNK` rows dealt out to the infer requests (one per stream) as
        they come free: a stream slowed down by the decoding threads holds up the other one by one chunk
        at most, not by half the batch. No Python callbacks (they would need the GIL in OpenVINO's
        threads); ``wait`` releases the GIL."""
        from collections import deque

        _, _, requests, dim = compiled
        out = np.empty((len(x), dim), np.float32)

        def collect(r, start):
            r.wait()
            y = r.get_output_tensor(0).data
            out[start:start + len(y)] = y

        with self.lock:  # one batch at a time through the shared requests
            free, busy = list(requests), deque()
            for start in range(0, len(x), OV_CHUNK):
                if not free:  # the oldest chunk in flight is the one due first
                    r, s0 = busy.popleft()
                    collect(r, s0)
                    free.append(r)
                r = free.pop()
                r.start_async({0: x[start:start + OV_CHUNK]}, share_inputs=True)
                busy.append((r, start))
            while busy:
                collect(*busy.popleft())
        return out

    def run_uint8(self, x: np.ndarray) -> np.ndarray:
        return self._infer(self.uint8, x)

    def run_float(self, x: np.ndarray) -> np.ndarray:
        if self._float is None:
            with self._float_lock:  # not self.lock: the check below runs _infer, which takes it
                if self._float is None:
                    compiled = self._compile(self.core.read_model(str(self.xml)))
                    if self._float_check is not None:  # checked once, before anyone can use it
                        self._float_check(lambda a: self._infer(compiled, a))
                    self._float = compiled
        return self._infer(self._float, x)


class _OrtRunner:
    """onnxruntime on the float32 NCHW export; uint8 NHWC batches are normalised in numpy first."""

    def __init__(self, onnx_path: Path, threads: int | None = None, normalize: Callable | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.normalize = normalize
        self.info = {"device": "CPU", "intra_op_threads": so.intra_op_num_threads,
                     "input": "float32 NCHW (uint8 normalised in numpy)"}

    def run_float(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.sess.run(["embedding"], {"image": x})[0], dtype=np.float32)

    def run_uint8(self, x: np.ndarray) -> np.ndarray:
        return self.run_float(self.normalize(x))


class _TorchRunner:
    def __init__(self, encoder, device: str, channels_last: bool = True, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5)):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        # (x / 255 - mean) / std == x * scale + shift: EvalTransformNP.normalize's constants, on the device
        norm = eval_transform_np(mean=mean, std=std)
        self.scale = torch.from_numpy(norm.scale).to(self.device).view(1, 3, 1, 1)
        self.shift = torch.from_numpy(norm.shift).to(self.device).view(1, 3, 1, 1)
        self.info = {"device": str(self.device), "channels_last": self.channels_last,
                     "input": "uint8 NHWC (normalised by torch on the device)"}

    def _forward(self, t):
        torch = self.torch
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            y = self.encoder(t)
        return y.float().cpu().numpy()

    def run_float(self, x: np.ndarray) -> np.ndarray:
        return self._forward(self.torch.from_numpy(x).to(self.device, non_blocking=True))

    def run_uint8(self, x: np.ndarray) -> np.ndarray:
        t = self.torch.from_numpy(x).to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC: channels_last
        return self._forward(t.float() * self.scale + self.shift)


# ====================================================================== the engine
class InferenceEngine:
    """What embedding callers use from an Encoder, on a compiled backend.

    ``spec``, ``preprocess`` (PIL -> uint8 ``(S, S, 3)`` numpy, no torch: the resized, cropped pixels;
    ``preprocess_mode`` ``exact`` or ``fast``, see :class:`~skulens.model.transform.EvalTransformNP`),
    ``embed_dim``, ``image_size``, ``backend``, ``device``, ``parity`` (dict), ``fallbacks`` (backends
    skipped and why), ``run(batch)``: a uint8 NHWC batch of ``preprocess`` outputs (normalised inside the
    compiled graph for OpenVINO) or a normalised float32 NCHW batch (as ``Encoder.forward`` takes)
    -> ``(B, D)`` unnormalised features. Thread-safe.
    """

    training = False  # an engine is always in eval mode (callers that toggle encoders see a no-op)

    def __init__(self, spec: ModelSpec, backend: str, device: str, runner, parity: dict,
                 artifact: Path | None = None, fallbacks: list | None = None, seconds: float | None = None,
                 preprocess: str = "exact"):
        self.spec = spec
        self.backend = backend
        self.device = device
        self._runner = runner
        self.parity = parity
        self.artifact = artifact
        self.fallbacks = list(fallbacks or [])
        self.load_seconds = seconds
        self.preprocess_mode = preprocess
        self.preprocess = eval_transform_np(spec.image_size, spec.mean, spec.std, spec.interpolation,
                                            spec.crop_pct, mode=preprocess, output="uint8", fit=spec.fit)

    @property
    def embed_dim(self) -> int:
        return int(self.spec.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.spec.image_size)

    def run(self, batch: np.ndarray) -> np.ndarray:
        s = self.image_size
        x = np.asarray(batch)
        if x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (s, s, 3):
            fn = self._runner.run_uint8
        elif x.ndim == 4 and x.shape[1:] == (3, s, s) and x.dtype != np.uint8:
            x, fn = x.astype(np.float32, copy=False), self._runner.run_float
        else:
            raise ValueError(f"expected a uint8 (B, {s}, {s}, 3) or float32 (B, 3, {s}, {s}) batch, "
                             f"got {x.dtype} {x.shape}")
        if len(x) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return fn(np.ascontiguousarray(x))

    __call__ = run

    def eval(self) -> InferenceEngine:
        return self

    def train(self, mode: bool = True) -> InferenceEngine:
        return self

    def info(self) -> dict:
        """A flat summary for metadata and logs."""
        return {"backend": self.backend, "device": self.device, "preprocess": self.preprocess_mode,
                "parity_max_abs_diff": self.parity.get("max_abs_diff"),
                "parity_max_cos_diff": self.parity.get("max_cos_diff"),
                "parity_ok": self.parity.get("ok"),
                "fallbacks": "; ".join(f"{f['backend']}: {f['reason']}" for f in self.fallbacks) or "none",
                **{f"runtime_{k}": v for k, v in (getattr(self._runner, "info", None) or {}).items()}}

    def __repr__(self) -> str:
        return (f"InferenceEngine({self.spec.name}, backend={self.backend}, device={self.device}, "
                f"preprocess={self.preprocess_mode}, max|diff|={self.parity.get('max_abs_diff')})")


# ====================================================================== compile / load
def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(p: Path, obj: dict) -> None:
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, p)


def _spec_of(model_path: Path, record: dict) -> ModelSpec | None:
    if record.get("spec"):
        return ModelSpec.from_dict(record["spec"])
    side = _read_json(model_path.with_name(model_path.name + ".json"))
    return ModelSpec.from_dict(side["spec"]) if side.get("spec") else None


class _Compiler:
    """Everything about one model file's engine directory; torch is loaded only when needed."""

    def __init__(self, model_path: Path, load_torch: Callable[[str], object] | None):
        self.model_path = Path(model_path)
        self.dir = engine_dir(model_path)
        self._load_torch = load_torch
        self._encoders: dict = {}
        self.source = source_of(self.model_path)
        self.record = _read_json(self.dir / "engine.json")
        if self.source is not None and self._stale():
            self._discard_stale()

    def _stale(self) -> bool:
        if self.record:  # a finished record: from this file only if it names this file's size and mtime
            return self.record.get("source") != self.source
        # no record yet: a compile in progress (another process, same file) or one that died half-way;
        # stale only if what is there is older than the file
        ref = self.dir / "reference.npz"
        try:
            return ref.stat().st_mtime_ns < self.source["mtime_ns"]
        except OSError:
            return False

    def _discard_stale(self) -> None:
        """The engine directory was compiled from another file at this path (or by code that did not
        record which): move it aside and delete it, so everything is compiled from the current weights."""
        log.warning("engine cache %s is not from the current %s: recompiling", self.dir, self.model_path.name)
        aside = self.dir.with_name(f"{self.dir.name}.stale{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.replace(self.dir, aside)
        except OSError:  # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
        self.record = {}

    # torch, on demand
    def encoder(self, device: str = "cpu"):
        if device not in self._encoders:
            if self._load_torch is not None:
                self._encoders[device] = self._load_torch(device)
            else:
                from .io import load_encoder

                self._encoders[device] = load_encoder(self.model_path, device=device)
        return self._encoders[device]

    def spec(self) -> ModelSpec:
        spec = _spec_of(self.model_path, self.record)
        return spec if spec is not None else self.encoder("cpu").spec

    def reference(self) -> dict:
        """``reference.npz``: ``x`` (a fixed random float32 NCHW batch) and ``y`` (PyTorch's CPU FP32
        output for it); ``xu8`` (a fixed random uint8 NHWC batch) and ``yu8`` (PyTorch's output for it
        normalised with the spec's mean/std, as :meth:`EvalTransformNP.normalize` does). Made once (with
        torch), then read without torch."""
        p = self.dir / "reference.npz"
        try:
            with np.load(p, allow_pickle=False) as z:
                ref = {k: z[k] for k in ("x", "y", "xu8", "yu8")}
            return ref
        except (OSError, ValueError, KeyError):  # missing, damaged, or from before the uint8 input
            pass
        import torch

        enc = self.encoder("cpu")
        spec = enc.spec
        size = int(spec.image_size)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((PARITY_BATCH, 3, size, size)).astype(np.float32)
        xu8 = rng.integers(0, 256, (PARITY_BATCH, size, size, 3), dtype=np.uint8)
        norm = eval_transform_np(size, spec.mean, spec.std, spec.interpolation, spec.crop_pct).normalize
        was = enc.training
        enc.eval()
        dev = next(enc.parameters()).device
        with torch.inference_mode():
            y = enc(torch.from_numpy(x).to(dev)).float().cpu().numpy()
            yu8 = enc(torch.from_numpy(norm(xu8)).to(dev)).float().cpu().numpy()
        enc.train(was)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, x=x, y=y, xu8=xu8, yu8=yu8)
        os.replace(tmp, p)
        self._save(spec=spec.to_dict())
        return {"x": x, "y": y, "xu8": xu8, "yu8": yu8}

    def _save(self, **kw) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        rec = _read_json(self.dir / "engine.json")
        rec.setdefault("format", FORMAT)
        if self.source is not None:
            rec["source"] = self.source
        backends = {**rec.get("backends", {}), **kw.pop("backends", {})}
        rec.update(kw)
        rec["backends"] = backends
        _write_json(self.dir / "engine.json", rec)
        self.record = rec

    # artifacts
    def onnx(self) -> Path:
        p = self.dir / "model.onnx"
        if not p.is_file():
            from .export import export_onnx

            export_onnx(self.encoder("cpu"), p, check=False)
        return p

    def openvino_ir(self) -> Path:
        xml = self.dir / "openvino" / "model.xml"
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            return xml
        import openvino as ov

        model = ov.Core().read_model(str(self.onnx()))
        tmp = self.dir / f".openvino.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        try:
            os.replace(tmp, xml.parent)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
        return xml

    def runner(self, backend: str, device: str, precision: str, hint: str):
        spec = self.spec()
        if backend == "openvino":
            return (_OpenVINORunner(self.openvino_ir(), self.dir / "ov_cache", precision, hint, spec.mean, spec.std,
                                    _openvino_config()),
                    self.dir / "openvino")
        if backend == "onnxruntime":
            norm = eval_transform_np(spec.image_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct).normalize
            return _OrtRunner(self.onnx(), normalize=norm), self.dir / "model.onnx"
        return _TorchRunner(self.encoder(device), device, mean=spec.mean, std=spec.std), self.model_path

    def try_backend(self, backend: str, device: str, precision: str, hint: str):
        """``(runner, artifact, parity)``; raises :class:`EngineError` with the reason it cannot be used."""
        why = _available(backend)
        if why:
            raise EngineError(why)
        key = backend if backend != "openvino" or precision == "f32" else f"openvino-{precision}"
        vers = _versions()
        prev = self.record.get("backends", {}).get(key) or {}
        if prev.get("ok") is False and prev.get("runtime") == vers.get(backend):  # failed before, same runtime
            raise EngineError(f"{prev.get('reason')} (recorded in {self.dir / 'engine.json'})")
        t0 = time.perf_counter()
        cached = backend != "torch" and all(
            (self.dir / f).is_file() for f in ("reference.npz", "engine.json")) and bool(prev.get("ok"))
        try:
            ref = self.reference()
            runner, artifact = self.runner(backend, device, precision, hint)
            stats = parity_stats(runner.run_uint8(ref["xu8"]), ref["yu8"])  # the input embedding feeds it
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - a backend that fails to compile/run is skipped, with why
            reason = f"compile/run failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            self._save(backends={key: {"ok": False, "reason": reason, "runtime": vers.get(backend)}})
            raise EngineError(reason) from e
        atol, cos_tol = TOLERANCE.get(precision if backend == "openvino" else "f32", TOLERANCE["f32"])
        if backend == "torch" and str(device).startswith("cuda"):  # TF32/cuDNN algorithms: looser, still checked
            atol, cos_tol = TOLERANCE["bf16"]
        ok = stats["max_abs_diff"] <= atol and stats["max_cos_diff"] <= cos_tol
        if ok and hasattr(runner, "_float_check"):  # the float model, compiled on first use, is checked then
            runner._float_check = _float_checker(ref["x"], ref["y"], atol, cos_tol, backend)
        parity = {"backend": backend, "device": device, "precision": precision if backend == "openvino" else "f32",
                  **stats, "atol": atol, "cos_tol": cos_tol, "ok": bool(ok), "batch": int(len(ref["xu8"])),
                  "input": (getattr(runner, "info", None) or {}).get("input"),
                  "checked": "load" if cached else "compile", "runtime": vers.get(backend),
                  "reference": "torch CPU float32 eager on a fixed random uint8 batch (seed 0), normalised"}
        if not ok:
            reason = (f"parity failed: max |diff| {stats['max_abs_diff']:.3g} (atol {atol:g}), "
                      f"max 1-cos {stats['max_cos_diff']:.3g} (tol {cos_tol:g})")
            self._save(backends={key: {"ok": False, "reason": reason, "runtime": vers.get(backend), **parity}})
            raise EngineError(reason)
        parity["seconds"] = round(time.perf_counter() - t0, 3)
        if not cached and backend != "torch":
            self._save(backends={key: {**parity, "compiled_with": vers}})
        return runner, artifact, parity


def _float_checker(x: np.ndarray, y: np.ndarray, atol: float, cos_tol: float, backend: str) -> Callable:
    def check(run):
        stats = parity_stats(run(x), y)
        if not (stats["max_abs_diff"] <= atol and stats["max_cos_diff"] <= cos_tol):
            raise EngineError(f"{backend} float32-input model failed parity: max |diff| {stats['max_abs_diff']:.3g}, "
                              f"max 1-cos {stats['max_cos_diff']:.3g}")
    return check


#: OpenVINO CPU properties from the environment (``SKULENS_OPENVINO_STREAMS``, ``SKULENS_OPENVINO_THREADS``)
ENV_OV_STREAMS, ENV_OV_THREADS = "SKULENS_OPENVINO_STREAMS", "SKULENS_OPENVINO_THREADS"


def _openvino_config() -> dict:
    cfg = {}
    if os.environ.get(ENV_OV_STREAMS):
        cfg["NUM_STREAMS"] = int(os.environ[ENV_OV_STREAMS])
    if os.environ.get(ENV_OV_THREADS):
        cfg["INFERENCE_NUM_THREADS"] = int(os.environ[ENV_OV_THREADS])
    return cfg


_memo: OrderedDict = OrderedDict()
_memo_lock = threading.Lock()
_build_locks: dict = {}


def load_engine(model_path: str | os.PathLike, backend: str | None = None, device: str = "cpu",
                load_torch: Callable[[str], object] | None = None, precision: str = "f32",
                hint: str = "THROUGHPUT", preprocess: str | None = None) -> InferenceEngine:
    """Compile (or load from ``<model_path>.engine/``) the engine of a skulens encoder file.

    ``backend``: ``auto`` | ``openvino`` | ``onnxruntime`` | ``torch`` (None: :func:`backend_setting`).
    An explicit backend that cannot be used raises :class:`EngineError`; ``auto`` falls back in order
    and records each skip in ``engine.fallbacks``. ``load_torch(device)`` returns the PyTorch encoder
    (default :func:`skulens.model.io.load_encoder` on the file); it is called only when something has
    to be compiled or the backend is ``torch``. ``precision``: ``f32`` (default) or ``bf16``
    (OpenVINO only, opt-in, looser parity tolerance). ``preprocess``: ``exact`` | ``fast`` (None:
    :func:`~skulens.model.transform.preprocess_setting`, i.e. ``$SKULENS_PREPROCESS``), the engine's
    ``preprocess`` transform."""
    t0 = time.perf_counter()
    backend = backend_setting(backend)
    preprocess = preprocess_setting(preprocess)
    if precision not in TOLERANCE:
        raise ValueError(f"precision {precision!r}: one of {sorted(TOLERANCE)}")
    device = str(device or "cpu")
    comp = _Compiler(Path(model_path), load_torch)
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            log.warning("CUDA requested but not available: the engine runs on the CPU")
            device, cuda = "cpu", False
    if backend == "auto":
        order = ["torch"] if cuda else list(BACKENDS)
    else:
        order = [backend]
    if cuda and backend in ("openvino", "onnxruntime"):
        device = "cpu"  # these run on the CPU here
    fallbacks = []
    for b in order:
        try:
            runner, artifact, parity = comp.try_backend(b, device if b == "torch" else "cpu", precision, hint)
        except EngineError as e:
            if backend != "auto":
                raise EngineError(f"inference backend {b!r} for {model_path}: {e}") from e
            log.warning("inference backend %s skipped for %s: %s", b, Path(model_path).name, e)
            fallbacks.append({"backend": b, "reason": str(e)})
            continue
        return InferenceEngine(comp.spec(), b, device if b == "torch" else "cpu", runner, parity, artifact, fallbacks,
                               round(time.perf_counter() - t0, 3), preprocess)
    raise EngineError(f"no inference backend for {model_path}: "
                      + "; ".join(f"{f['backend']}: {f['reason']}" for f in fallbacks))


def get_engine(model_path: str | os.PathLike, backend: str | None = None, device: str = "cpu",
               load_torch: Callable[[str], object] | None = None, precision: str = "f32",
               key: str | None = None, preprocess: str | None = None) -> InferenceEngine:
    """:func:`load_engine`, once per process and (file, backend, device, precision, preprocess mode):
    later calls return the same engine. ``key`` names the file (e.g. its sha256) when its path may be reused."""
    backend = backend_setting(backend)
    preprocess = preprocess_setting(preprocess)
    # without a content key, the file's size and mtime are part of the key: new weights written at the
    # same path get a new engine (load_engine also recompiles the stale engine directory)
    k = (key or (str(Path(model_path).resolve()), json.dumps(source_of(model_path), sort_keys=True)), backend,
         str(device), precision, preprocess)
    with _memo_lock:
        eng = _memo.get(k)
        if eng is not None:
            _memo.move_to_end(k)
            return eng
        lock = _build_locks.setdefault(k, threading.Lock())
    with lock:  # one compile per key, even with concurrent callers
        with _memo_lock:
            eng = _memo.get(k)
        if eng is None:
            eng = load_engine(model_path, backend, device, load_torch, precision, preprocess=preprocess)
            with _memo_lock:
                _memo[k] = eng
                _build_locks.pop(k, None)  # later callers find it in _memo (or build it afresh, evicted)
                while len(_memo) > 4:  # challenger, champion, base... a few versions at most
                    _memo.popitem(last=False)
    return eng
