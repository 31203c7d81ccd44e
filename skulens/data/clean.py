"""Data-quality stage, core (no Dagster): inspect every cached original image, drop what is unusable,
normalise what needs it, and give every SKU its role.

Two roles (the single-shot setting: many product databases hold one packshot per SKU, and every
launch starts with one):

* ``train``: at least ``min_images_per_sku`` (3) usable images: a training class for fine-tuning,
  and indexed;
* ``index``: 1 .. ``min_images_per_sku - 1`` usable images: never trained on, but indexed (with
  shelf-like views, see :mod:`skulens.pipeline_eval`), so it is recognizable.

Only SKUs with fewer than ``min_index_images`` (1) usable images are dropped (SKU_TOO_FEW_IMAGES):
a packshot-only catalog is kept whole. ``kept`` carries the ``role`` column; ``sku_roles`` has one
row per kept SKU.

Packshots (the catalog contract, :mod:`skulens.catalog.contract`): ``kept`` and ``images`` carry a boolean
``packshot`` column, True on at most one kept row per SKU: the file products.csv's ``packshot`` column
names, else a file named ``packshot.<ext>``, when that file is kept. A named packshot that is not a safe
file name, is not in the manifest or is dropped is never an error: the SKU falls back (no packshot row:
consumers take its first image) and ``packshots`` records why. Of byte-identical copies within a SKU
(DUPLICATE_IN_SKU) the packshot's copy is the one kept.

Input is the ingest manifest (one row per S3 object: ``sku, key, etag, bytes, path``) and, optionally,
the ``products`` table from ``catalog/products.csv``. Originals are never modified: usable plain-RGB
images keep ``clean_path == path`` (bit-exact); images that need normalisation (EXIF rotation, CMYK,
palette, 16-bit, grey, alpha) get a lossless RGB PNG under ``out_dir`` named ``<sha256 of original>.png``.

Per-file checks (first failing one wins, in this order)::

    MISSING_FILE, EMPTY, TOO_LARGE_BYTES, CORRUPT (md5 != S3 ETag), TOO_SMALL_BYTES,
    NOT_AN_IMAGE, DECOMPRESSION_BOMB, UNSUPPORTED_FORMAT, TOO_SMALL_DIMENSIONS,
    TRUNCATED / CORRUPT (container structure: JPEG markers, PNG chunk CRCs), TRUNCATED / CORRUPT (full decode),
    DECODE_TIMEOUT (header parse + structure checks + full decode took over ``decode_timeout_s``)

then catalog-level rules: UNKNOWN_SKU, DUPLICATE_ACROSS_SKUS, DUPLICATE_IN_SKU, NORMALISATION_FAILED
(or DECODE_TIMEOUT when normalising one file takes over ``decode_timeout_s``), SKU_TOO_FEW_IMAGES.

Decode time limit (``decode_timeout_s``, default 20 s, 0 = off): a wall-clock limit per file on decoding
(inspection and normalisation), enforced with ``SIGALRM`` (``setitimer``) where the work runs in a
process's main thread: every worker of the process backend, and serial (in-process) runs called from the
main thread. Pillow decodes in chunks driven from Python, so the alarm stops it between chunks; a single
native call that never returns is not interrupted (a decoder that crashes its worker is handled by the
pool). Thread-backend workers (and callers outside the main thread) run without the limit. An outer
``ITIMER_REAL`` timer (e.g. pytest-timeout) is kept: it is re-armed with its remaining time afterwards.
Animated images (GIF, WebP, APNG) are inspected and normalised on their first frame.

Known limit: libjpeg silently conceals some damage inside JPEG entropy-coded data (e.g. a block of zero
bytes) and Pillow does not expose its warnings, so such a file decodes "fine". Damage that happened after
upload is still caught by comparing the local copy's MD5 with the S3 ETag (``verify_etag``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from skulens.catalog import contract
from skulens.data.images import to_rgb  # the one RGB conversion (also used by every embedding path)

# --------------------------------------------------------------------------------------------------
# Reason codes (stable strings: they end up in CSV reports, Dagster metadata and GX docs)
# --------------------------------------------------------------------------------------------------
MISSING_FILE = "MISSING_FILE"  # the cached original is not there / cannot be read
EMPTY = "EMPTY"  # zero bytes
TOO_LARGE_BYTES = "TOO_LARGE_BYTES"  # file larger than cfg.max_bytes (never read into memory)
TOO_SMALL_BYTES = "TOO_SMALL_BYTES"  # fewer than cfg.min_bytes
NOT_AN_IMAGE = "NOT_AN_IMAGE"  # no image format recognised (HTML error page saved as .jpg, XML, text ...)
UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"  # an image, but not in cfg.allowed_formats
DECOMPRESSION_BOMB = "DECOMPRESSION_BOMB"  # header declares more than cfg.max_pixels pixels
TOO_SMALL_DIMENSIONS = "TOO_SMALL_DIMENSIONS"  # shorter side < cfg.min_side
TRUNCATED = "TRUNCATED"  # data ends early (partial download)
CORRUPT = "CORRUPT"  # decoder / container error, or local bytes differ from the S3 ETag
DECODE_TIMEOUT = "DECODE_TIMEOUT"  # decoding one file took longer than cfg.decode_timeout_s
DUPLICATE_IN_SKU = "DUPLICATE_IN_SKU"  # same bytes as an earlier key (key order; the packshot first) of the same SKU
DUPLICATE_ACROSS_SKUS = "DUPLICATE_ACROSS_SKUS"  # same bytes filed under 2+ SKUs (see CleanConfig)
UNKNOWN_SKU = "UNKNOWN_SKU"  # image's SKU is not in products.csv (only when products is given)
NORMALISATION_FAILED = "NORMALISATION_FAILED"  # decoded, but could not be converted to RGB / written
SKU_TOO_FEW_IMAGES = "SKU_TOO_FEW_IMAGES"  # SKU left with < cfg.min_images_per_sku usable images

FILE_REASONS = (
    MISSING_FILE, EMPTY, TOO_LARGE_BYTES, TOO_SMALL_BYTES, NOT_AN_IMAGE, UNSUPPORTED_FORMAT,
    DECOMPRESSION_BOMB, TOO_SMALL_DIMENSIONS, TRUNCATED, CORRUPT, DECODE_TIMEOUT,
)
CATALOG_REASONS = (UNKNOWN_SKU, DUPLICATE_ACROSS_SKUS, DUPLICATE_IN_SKU, NORMALISATION_FAILED, SKU_TOO_FEW_IMAGES)
ALL_REASONS = FILE_REASONS + CATALOG_REASONS

CROSS_SKU_RULES = ("drop_all", "keep_first", "keep_all")
MANIFEST_COLUMNS = ("sku", "key", "etag", "bytes", "path")
NORMALISED_VERSION = 1  # bump if the normalisation recipe changes (it is part of the file name)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CleanConfig:
    """Thresholds and execution settings of the cleaning stage.

    cross_sku_duplicates -- what to do with byte-identical images (same sha256) filed under 2+ SKUs:
      * "drop_all" (default): a catalog error (a photo cannot show two products, so at least one
        SKU is mislabelled and we cannot tell which): every copy is dropped and reported with
        DUPLICATE_ACROSS_SKUS, the detail names the other SKUs.
      * "keep_first": keep the copies of the lexicographically smallest SKU, drop the others.
      * "keep_all": keep every copy (e.g. variants that legitimately share a pack shot); still visible
        in ``checks.check_cross_sku_duplication``.
    Duplicates are exact byte duplicates (sha256), not perceptual near-duplicates.
    """

    min_bytes: int = 1024
    max_bytes: int = 200 * 1024 * 1024
    min_side: int = 32
    max_pixels: int = 50_000_000
    min_images_per_sku: int = 3  # usable images a SKU needs to be a training class (role "train")
    min_index_images: int = 1  # usable images a SKU needs to be kept at all (role "index" below min_images_per_sku)
    allowed_formats: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF")
    cross_sku_duplicates: str = "drop_all"
    max_dropped_share: float = 0.2  # the blocking check: at most this share of the files may be dropped
    verify_etag: bool = True  # compare md5(local file) with a plain (non-multipart) S3 ETag
    workers: int = field(default_factory=_default_workers)
    backend: str = "process"  # "process" (ProcessPoolExecutor) or "thread"
    start_method: str | None = None  # multiprocessing start method; None -> "forkserver" where available
    chunk_size: int = 32  # images per task sent to a worker
    min_parallel: int = 64  # fewer images than this are inspected in-process
    decode_timeout_s: float = 20.0  # per-file decode time limit (s), 0 = off; see the module docstring

    def __post_init__(self) -> None:
        if self.cross_sku_duplicates not in CROSS_SKU_RULES:
            raise ValueError(f"cross_sku_duplicates must be one of {CROSS_SKU_RULES}, got {self.cross_sku_duplicates!r}")
        if self.backend not in ("process", "thread"):
            raise ValueError(f"backend must be 'process' or 'thread', got {self.backend!r}")
        if self.max_pixels <= 0 or self.min_side < 1 or self.min_images_per_sku < 1 or self.min_index_images < 1:
            raise ValueError("max_pixels, min_side, min_images_per_sku and min_index_images must be positive")
        if not 0.0 <= self.max_dropped_share <= 1.0:
            raise ValueError(f"max_dropped_share must be within [0, 1], got {self.max_dropped_share!r}")
        t = self.decode_timeout_s
        if not (isinstance(t, (int, float)) and 0 <= t < float("inf")):  # NaN fails too
            raise ValueError(f"decode_timeout_s must be a finite number >= 0 (0 = no limit), got {t!r}")
        object.__setattr__(self, "allowed_formats", tuple(f.upper() for f in self.allowed_formats))


@dataclass
class ImageReport:
    """Result of inspecting one file. width/height are the *displayed* size (EXIF rotation applied)."""

    ok: bool
    reason: str = ""
    detail: str = ""
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    mode: str | None = None
    exif_orientation: int | None = None
    needs_normalisation: bool = False


# --------------------------------------------------------------------------------------------------
# Pixel limit: Pillow's global MAX_IMAGE_PIXELS, set for the duration of a call (re-entrant)
# --------------------------------------------------------------------------------------------------
_limit_lock = threading.Lock()
_limit_active: list[int] = []
_limit_saved: Any = None


@contextmanager
def pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Set ``PIL.Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` (the smallest active limit wins), restore after.

    Pillow warns above the limit and raises ``DecompressionBombError`` above twice the limit, while
    parsing the header (before any pixel buffer is allocated). ``inspect_image`` additionally rejects
    anything above the limit itself, so no decode ever allocates more than ``max_pixels`` pixels.
    """
    global _limit_saved
    with _limit_lock:
        if not _limit_active:
            _limit_saved = Image.MAX_IMAGE_PIXELS
        _limit_active.append(int(max_pixels))
        Image.MAX_IMAGE_PIXELS = min(_limit_active)
    try:
        yield
    finally:
        with _limit_lock:
            _limit_active.remove(int(max_pixels))
            Image.MAX_IMAGE_PIXELS = min(_limit_active) if _limit_active else _limit_saved


# --------------------------------------------------------------------------------------------------
# Decode time limit: SIGALRM in the main thread (see the module docstring)
# --------------------------------------------------------------------------------------------------
class _DecodeDeadline(BaseException):  # noqa: N818 - BaseException: no ``except Exception`` may swallow it
    """Raised by the alarm handler inside ``decode_deadline``; never leaves this module."""


def _alarm_available() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def decode_deadline(seconds: float) -> Iterator[None]:
    """Raise ``_DecodeDeadline`` in the block once ``seconds`` (wall clock) have passed; a no-op for
    ``seconds <= 0``, outside the main thread, or when SIGALRM has a handler installed outside Python.

    The previous SIGALRM handler and ``ITIMER_REAL`` timer are restored afterwards (an outer timer keeps
    its remaining time; if it comes due first, its handler runs as it would have). Callers catch
    ``_DecodeDeadline`` *outside* the ``with``: an alarm that is already due may surface while exiting.
    """
    if not seconds or seconds <= 0 or not _alarm_available():
        yield
        return
    prev_handler = signal.getsignal(signal.SIGALRM)
    if prev_handler is None:  # installed by C code: not ours to touch
        yield
        return
    start = time.monotonic()
    prev_delay, prev_interval = signal.getitimer(signal.ITIMER_REAL)
    ours_first = prev_delay <= 0 or seconds < prev_delay
    state = {"armed": True, "outer_fired": False}

    def on_alarm(signum, frame):
        if ours_first:
            if state["armed"]:  # not once the block is over (a late alarm is ignored)
                state["armed"] = False
                raise _DecodeDeadline
            return
        state["outer_fired"] = True  # the outer timer came due inside our block: behave as it would have
        signal.signal(signal.SIGALRM, prev_handler)
        if callable(prev_handler):
            prev_handler(signum, frame)
        elif prev_handler == signal.SIG_DFL:
            signal.raise_signal(signal.SIGALRM)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds if ours_first else prev_delay)
    try:
        yield
    finally:
        state["armed"] = False  # first: from here on the handler can no longer raise
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, prev_handler)
        if prev_delay > 0 and not state["outer_fired"]:
            remaining = prev_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3), prev_interval)
        elif state["outer_fired"] and prev_interval > 0:
            signal.setitimer(signal.ITIMER_REAL, prev_interval, prev_interval)


def _timeout_detail(cfg: CleanConfig, what: str) -> str:
    return f"{what} took longer than decode_timeout_s {cfg.decode_timeout_s:g} s"


# --------------------------------------------------------------------------------------------------
# Container structure checks (cheap, catch damage that libjpeg / zlib would silently conceal)
# --------------------------------------------------------------------------------------------------
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff([^\x00\xff])")  # FFFF fill bytes: match starts at the last FF
# markers that may legally follow entropy-coded data: DHT DAC DQT DNL DRI SOS EOI APPn COM
_JPEG_AFTER_SCAN = frozenset([0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xDA, 0xD9, 0xFE, *range(0xE0, 0xF0)])
_JPEG_STANDALONE = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])


def _jpeg_structure_problem(data: bytes) -> tuple[str, str] | None:
    """Walk the JPEG segments and the entropy-coded data up to EOI.

    Returns ``(reason, detail)`` for: no EOI (TRUNCATED), a segment running past the end (TRUNCATED),
    an illegal marker inside scan data or restart markers out of sequence (CORRUPT). Junk between
    header segments is tolerated (libjpeg skips it too); data after EOI is allowed (MPO, trailers).
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return CORRUPT, "JPEG does not start with SOI marker"
    pos = 2
    while True:
        # header part: find the next marker
        while pos < n and data[pos] != 0xFF:
            pos += 1
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            return TRUNCATED, "JPEG ends before EOI marker"
        m = data[pos]
        pos += 1
        if m == 0xD9:
            return None
        if m in _JPEG_STANDALONE or m == 0x00:
            continue
        if pos + 2 > n:
            return TRUNCATED, f"JPEG segment 0xFF{m:02X} cut off at offset {pos}"
        seg_len = (data[pos] << 8) | data[pos + 1]
        if seg_len < 2:
            return CORRUPT, f"JPEG segment 0xFF{m:02X} has invalid length {seg_len} at offset {pos}"
        pos += seg_len
        if pos > n:
            return TRUNCATED, f"JPEG segment 0xFF{m:02X} runs past end of file"
        if m != 0xDA:
            continue
        # entropy-coded data of a scan: only FF00 (stuffing), FFD0-D7 (restart, in sequence) and fill
        # bytes may appear until a marker that legally follows a scan
        expected_rst = 0
        while True:
            mo = _JPEG_MARKER_IN_SCAN.search(data, pos)
            if mo is None:
                return TRUNCATED, "JPEG scan data runs to end of file without EOI"
            mk = mo.group(1)[0]
            if 0xD0 <= mk <= 0xD7:
                if mk - 0xD0 != expected_rst:
                    return CORRUPT, (
                        f"JPEG restart marker RST{mk - 0xD0} out of sequence (expected RST{expected_rst}) "
                        f"at offset {mo.start()}"
                    )
                expected_rst = (expected_rst + 1) % 8
                pos = mo.end()
                continue
            if mk not in _JPEG_AFTER_SCAN:
                return CORRUPT, f"illegal marker 0xFF{mk:02X} inside JPEG scan data at offset {mo.start()}"
            pos = mo.start()  # hand back to the header walker
            break


def _png_structure_problem(data: bytes) -> tuple[str, str] | None:
    """Verify every PNG chunk's CRC (Pillow skips IDAT CRCs) and that IEND is present."""
    n = len(data)
    mv = memoryview(data)
    pos = 8
    while pos + 12 <= n:
        length = int.from_bytes(mv[pos : pos + 4], "big")
        ctype = bytes(mv[pos + 4 : pos + 8])
        end = pos + 12 + length
        if end > n:
            return TRUNCATED, f"PNG chunk {ctype.decode('latin-1')!r} cut off at offset {pos}"
        if zlib.crc32(mv[pos + 4 : end - 4]) != int.from_bytes(mv[end - 4 : end], "big"):
            return CORRUPT, f"PNG CRC mismatch in {ctype.decode('latin-1')!r} chunk at offset {pos}"
        if ctype == b"IEND":
            return None
        pos = end
    return TRUNCATED, "PNG ends before IEND chunk"


def _sniff_non_image(data: bytes) -> str:
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in head):
        return "looks like an SVG drawing (vector graphics are not decoded: upload a PNG or JPEG rendering)"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<body" in head:
        return "looks like an HTML page (an error/login page saved under an image name?)"
    if head.startswith((b"<?xml", b"<error")):
        return "looks like XML (an S3/HTTP error document?)"
    if head.startswith((b"{", b"[")):
        return "looks like JSON"
    if head.startswith(b"%pdf"):
        return "looks like a PDF document"
    return f"no known image signature (first bytes {data[:8].hex()})"


_ETAG_MD5 = re.compile(r"^[0-9a-f]{32}$")


def _etag_md5(etag: Any) -> str | None:
    """The MD5 in a plain S3 ETag, or None (multipart ``...-N`` ETags and missing values are not MD5s)."""
    if not isinstance(etag, str):
        return None
    e = etag.strip().strip('"').lower()
    return e if _ETAG_MD5.match(e) else None


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


# --------------------------------------------------------------------------------------------------
# Per-file inspection
# --------------------------------------------------------------------------------------------------
def inspect_image(path: str | os.PathLike, cfg: CleanConfig | None = None, etag: str | None = None) -> ImageReport:
    """Inspect one file: size limits, sha256, optional md5-vs-ETag, format, header limits, container
    structure, then a **full decode** (``img.load()``; truncated data raises: Pillow's
    ``LOAD_TRUNCATED_IMAGES`` is left False). Never raises for bad input; never modifies the file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _inspect_file(path, cfg or CleanConfig(), etag)


def _inspect_file(path: str | os.PathLike, cfg: CleanConfig, etag: Any) -> ImageReport:
    """inspect_image without its own warnings filter: batch callers install
    ``simplefilter("error", DecompressionBombWarning)`` once (catch_warnings is not thread-safe)."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        return ImageReport(False, MISSING_FILE, f"cannot stat file: {e.strerror or e}")
    if size == 0:
        return ImageReport(False, EMPTY, "file has 0 bytes", sha256=hashlib.sha256(b"").hexdigest())
    if size > cfg.max_bytes:
        return ImageReport(False, TOO_LARGE_BYTES, f"{size} bytes > max_bytes {cfg.max_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read(cfg.max_bytes + 1)  # bounded even if the file grows after stat()
    except OSError as e:
        return ImageReport(False, MISSING_FILE, f"cannot read file: {e.strerror or e}")
    if len(data) > cfg.max_bytes:
        return ImageReport(False, TOO_LARGE_BYTES, f"more than max_bytes {cfg.max_bytes} bytes")
    if not data:
        return ImageReport(False, EMPTY, "file has 0 bytes", sha256=hashlib.sha256(b"").hexdigest())
    sha = hashlib.sha256(data).hexdigest()
    if cfg.verify_etag:
        want = _etag_md5(etag)
        if want is not None:
            got = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if got != want:
                return ImageReport(
                    False, CORRUPT, f"local copy differs from the S3 object: md5 {got} != ETag {want}", sha256=sha
                )
    if len(data) < cfg.min_bytes:
        return ImageReport(False, TOO_SMALL_BYTES, f"{len(data)} bytes < min_bytes {cfg.min_bytes}", sha256=sha)
    return _inspect_bytes(data, sha, cfg)


def _inspect_bytes(data: bytes, sha: str, cfg: CleanConfig) -> ImageReport:
    rep = ImageReport(False, sha256=sha)
    Image.init()  # plugin imports (first call only) do not count against the decode time limit
    with pil_pixel_limit(cfg.max_pixels):  # outside the deadline: its lock is never held when the alarm fires
        try:
            with decode_deadline(cfg.decode_timeout_s):
                return _inspect_decode(data, rep, cfg)
        except _DecodeDeadline:
            rep.ok, rep.needs_normalisation = False, False
            rep.reason, rep.detail = DECODE_TIMEOUT, _timeout_detail(cfg, "inspecting and decoding")
            return rep


def _inspect_decode(data: bytes, rep: ImageReport, cfg: CleanConfig) -> ImageReport:
    """Header, limits, container structure and full decode of ``data`` (inside the pixel limit and deadline)."""

    def fail(reason: str, detail: str) -> ImageReport:
        rep.reason, rep.detail = reason, detail
        return rep

    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return fail(DECOMPRESSION_BOMB, f"header: {e}")
    except UnidentifiedImageError:
        return fail(NOT_AN_IMAGE, _sniff_non_image(data))
    except Exception as e:  # noqa: BLE001 - a recognised signature with an unreadable header
        return fail(CORRUPT, f"cannot parse header: {type(e).__name__}: {e}")
    with img:
        rep.format, rep.mode = img.format, img.mode
        w, h = img.size
        rep.width, rep.height = w, h
        if rep.format not in cfg.allowed_formats:
            return fail(UNSUPPORTED_FORMAT, f"format {rep.format} not in {list(cfg.allowed_formats)}")
        if w * h > cfg.max_pixels:
            return fail(DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}")
        if min(w, h) < cfg.min_side:
            return fail(TOO_SMALL_DIMENSIONS, f"{w}x{h}: shorter side < min_side {cfg.min_side}")
        if rep.format in ("JPEG", "MPO"):
            problem = _jpeg_structure_problem(data)
        elif rep.format == "PNG":
            problem = _png_structure_problem(data)
        else:
            problem = None
        if problem is not None:
            return fail(*problem)
        try:
            img.load()  # full decode
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return fail(DECOMPRESSION_BOMB, f"decode: {e}")
        except OSError as e:
            msg = str(e)
            return fail(TRUNCATED if "truncated" in msg.lower() else CORRUPT, f"decode failed: {msg}")
        except Exception as e:  # noqa: BLE001 - bad input must never stop the run
            return fail(CORRUPT, f"decode failed: {type(e).__name__}: {e}")
        rep.mode = img.mode
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - bad input must never stop the run
            orientation = None
        orientation = int(orientation) if isinstance(orientation, int) and 1 <= orientation <= 8 else None
        rep.exif_orientation = orientation
        if orientation in (5, 6, 7, 8):
            rep.width, rep.height = h, w
        rep.needs_normalisation = (
            img.mode != "RGB"
            or orientation not in (None, 1)
            or "transparency" in img.info
            or (_png_bit_depth(data) or 8) > 8
        )
    rep.ok = True
    return rep


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------
def normalised_name(sha256: str) -> str:
    """Deterministic file name of the normalised copy of an original with this sha256."""
    return f"{sha256}.v{NORMALISED_VERSION}.png"


def normalise_image(path: str | os.PathLike, out_dir: str | os.PathLike, cfg: CleanConfig | None = None,
                    sha256: str | None = None) -> Path:
    """Write the RGB, upright, lossless PNG of ``path`` to ``out_dir/<sha256>.v1.png`` (atomic rename;
    an existing file of that name is reused: names are content-addressed). Returns the path.

    Raises ``TimeoutError`` when decoding, converting and writing take longer than ``cfg.decode_timeout_s``
    (no partial file is left behind)."""
    cfg = cfg or CleanConfig()
    data = Path(path).read_bytes()
    sha = sha256 or hashlib.sha256(data).hexdigest()
    out = Path(out_dir)
    dest = out / normalised_name(sha)
    if dest.exists():
        return dest
    out.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    Image.init()
    with pil_pixel_limit(cfg.max_pixels):
        try:
            try:
                with decode_deadline(cfg.decode_timeout_s):
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
                        rgb = to_rgb(img)
                    rgb.save(tmp, format="PNG", compress_level=6)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except _DecodeDeadline:
            raise TimeoutError(_timeout_detail(cfg, "normalising")) from None
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Parallel execution
# --------------------------------------------------------------------------------------------------
def _inspect_chunk(items: Sequence[tuple[str, Any]], cfg: CleanConfig) -> list[ImageReport]:
    out = []
    for path, etag in items:
        try:
            out.append(_inspect_file(path, cfg, etag))
        except Exception as e:  # noqa: BLE001 - belt and braces: one bad file never stops the run
            out.append(ImageReport(False, CORRUPT, f"inspection error: {type(e).__name__}: {e}"))
    return out


def _normalise_chunk(items: Sequence[tuple[str, str]], cfg: CleanConfig,
                     out_dir: str) -> list[tuple[str | None, str, str]]:
    """(clean path or None, reason, detail) per item; reason is "" on success."""
    out: list[tuple[str | None, str, str]] = []
    for path, sha in items:
        try:
            out.append((str(normalise_image(path, out_dir, cfg, sha)), "", ""))
        except TimeoutError as e:
            out.append((None, DECODE_TIMEOUT, str(e)))
        except Exception as e:  # noqa: BLE001 - bad input must never stop the run
            out.append((None, NORMALISATION_FAILED, f"{type(e).__name__}: {e}"))
    return out


def _worker_init() -> None:
    """Process-pool worker setup: our own process, so the warnings filter can be set for good; every
    Pillow plugin is imported here, not inside the first file's decode time limit."""
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    Image.init()


@contextmanager
def _batch_warnings() -> Iterator[None]:
    """For serial/thread runs: bomb warnings raise for the duration of the run (set once, main thread)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _crash_inspect(item: Any) -> ImageReport:
    return ImageReport(False, CORRUPT, "decoder crashed the worker process (segfault/abort/out of memory)")


def _crash_normalise(item: Any) -> tuple[str | None, str, str]:
    return None, NORMALISATION_FAILED, "worker process crashed while normalising"


class _Runner:
    """Runs chunk functions serially or in a pool; survives worker crashes (BrokenProcessPool) by
    re-running the unfinished chunks one file per fresh process and marking the culprit."""

    def __init__(self, cfg: CleanConfig, n_items: int):
        self.cfg = cfg
        self.workers = max(1, int(cfg.workers))
        self.parallel = self.workers > 1 and n_items >= cfg.min_parallel
        self.executor: Any = None

    def _mp_context(self):
        import multiprocessing as mp

        method = self.cfg.start_method
        if method is None:
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["skulens.data.clean"])  # workers fork from a process that has us loaded
        return ctx

    def _new_executor(self, workers: int):
        if self.cfg.backend == "thread":
            return ThreadPoolExecutor(max_workers=workers)
        return ProcessPoolExecutor(max_workers=workers, mp_context=self._mp_context(), initializer=_worker_init)

    def __enter__(self) -> _Runner:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def map(self, fn: Callable[[Sequence[Any]], list], items: Sequence[Any], on_crash: Callable[[Any], Any],
            progress: bool = False, desc: str = "") -> list:
        n = len(items)
        bar = None
        if progress and n:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=desc, unit="img", smoothing=0.1)
        try:
            if not self.parallel or n < self.cfg.min_parallel:
                out = []
                step = max(1, self.cfg.chunk_size)
                for i in range(0, n, step):
                    part = fn(items[i : i + step])
                    out.extend(part)
                    if bar is not None:
                        bar.update(len(part))
                return out
            return self._map_parallel(fn, items, on_crash, bar)
        finally:
            if bar is not None:
                bar.close()

    def _map_parallel(self, fn, items, on_crash, bar) -> list:
        step = max(1, self.cfg.chunk_size)
        chunks = [(i, items[i : i + step]) for i in range(0, len(items), step)]
        results: dict[int, list] = {}
        if self.executor is None:
            self.executor = self._new_executor(self.workers)
        pending = {self.executor.submit(fn, chunk): (start, chunk) for start, chunk in chunks}
        failed: list[tuple[int, Sequence[Any]]] = []
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                start, chunk = pending.pop(fut)
                try:
                    results[start] = fut.result()
                    if bar is not None:
                        bar.update(len(chunk))
                except BrokenProcessPool:
                    failed.append((start, chunk))
        if failed:  # a worker died: the pool is unusable; isolate the culprit(s) one file per process
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
            for start, chunk in failed:
                part = []
                for item in chunk:
                    with self._new_executor(1) as one:
                        try:
                            part.extend(one.submit(fn, [item]).result())
                        except BrokenProcessPool:
                            part.append(on_crash(item))
                results[start] = part
                if bar is not None:
                    bar.update(len(chunk))
        out: list = []
        for start, _chunk in chunks:
            out.extend(results[start])
        return out


# --------------------------------------------------------------------------------------------------
# Catalog-level cleaning
# --------------------------------------------------------------------------------------------------
@dataclass
class CleanResult:
    """Outcome of ``clean_catalog``.

    images        -- one row per manifest row (sorted by sku, key): manifest columns + sha256, width, height,
                     format, mode, exif_orientation, normalised, clean_path, status ("kept"/"dropped"),
                     reason, detail. This is the table the GX suite validates.
    kept          -- manifest columns + sha256, width, height, format, mode, normalised, clean_path.
    dropped_files -- sku, key, reason, detail.
    dropped_skus  -- sku, reason, detail, usable_images (SKUs from the manifest and from products.csv).
    sku_roles     -- sku, usable_images, role ("train" or "index"): one row per kept SKU.
    stats         -- counts (see ``clean_catalog``), JSON-serialisable.
    packshots     -- one row per SKU that names a packshot (products.csv) or has a ``packshot.<ext>`` file:
                     sku, packshot (the cell or file name), source ("products.csv" / "file name"),
                     status ("used", "missing", "dropped", "invalid"), reason (the drop reason when
                     dropped), detail, key (the image key used as the SKU's packshot; "" when none).
    """

    images: pd.DataFrame
    kept: pd.DataFrame
    dropped_files: pd.DataFrame
    dropped_skus: pd.DataFrame
    stats: dict[str, Any]
    config: CleanConfig | None = None
    sku_roles: pd.DataFrame | None = None
    packshots: pd.DataFrame | None = None

    def write_csv(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write dropped_files.csv, dropped_skus.csv and stats.json into ``directory``; return their paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {
            "dropped_files": d / "dropped_files.csv",
            "dropped_skus": d / "dropped_skus.csv",
            "sku_roles": d / "sku_roles.csv",
            "packshots": d / "packshots.csv",
            "stats": d / "stats.json",
        }
        self.dropped_files.to_csv(paths["dropped_files"], index=False)
        self.dropped_skus.to_csv(paths["dropped_skus"], index=False)
        roles = self.sku_roles if self.sku_roles is not None else pd.DataFrame(columns=["sku", "usable_images", "role"])
        roles.to_csv(paths["sku_roles"], index=False)
        shots = self.packshots if self.packshots is not None else pd.DataFrame(columns=PACKSHOT_REPORT_COLUMNS)
        shots.to_csv(paths["packshots"], index=False)
        paths["stats"].write_text(json.dumps(self.stats, indent=2, sort_keys=True) + "\n")
        return paths


PACKSHOT_REPORT_COLUMNS = ["sku", "packshot", "source", "status", "reason", "detail", "key"]


def _packshot_ranks(img: pd.DataFrame, named: dict[str, str]) -> np.ndarray:
    """Per manifest row: 0 = the file products.csv names as the SKU's packshot, 1 = a ``packshot.<ext>`` file,
    2 = any other image."""
    fname = img["key"].astype(str).str.rsplit("/", n=1).str[-1]
    is_named = (fname == img["sku"].map(named)).to_numpy(dtype=bool)
    conv = fname.map(contract.is_packshot_convention).to_numpy(dtype=bool)
    return np.where(is_named, 0, np.where(conv, 1, 2))


def _packshot_report(img: pd.DataFrame, rank: np.ndarray, chosen: np.ndarray, named: dict[str, str],
                     bad_cells: list[tuple[str, str, str]]) -> pd.DataFrame:
    """The ``packshots`` table of :class:`CleanResult` (see there)."""
    used = dict(zip(img.loc[chosen, "sku"], img.loc[chosen, "key"].astype(str)))
    rows = []
    for sku, cell, why in bad_cells:
        rows.append((sku, cell, "products.csv", "invalid", "", why + "; falls back", used.get(sku, "")))
    named_rows = img.loc[rank == 0, ["sku", "reason", "detail"]].drop_duplicates("sku")
    found = dict(zip(named_rows["sku"], zip(named_rows["reason"], named_rows["detail"])))
    for sku, name in sorted(named.items()):
        fallback = f"; the SKU uses {used[sku]}" if sku in used else "; the SKU uses its first image"
        if sku not in found:
            rows.append((sku, name, "products.csv", "missing", "",
                         f"no file {name!r} in {contract.CATALOG_IMAGES_PREFIX}{sku}/{fallback}", used.get(sku, "")))
            continue
        why, detail = found[sku]
        if why:
            rows.append((sku, name, "products.csv", "dropped", why, f"{detail}{fallback}", used.get(sku, "")))
        else:
            rows.append((sku, name, "products.csv", "used", "", "", used[sku]))
    conv_used = img.loc[chosen & (rank == 1), ["sku", "key"]]
    for sku, key in zip(conv_used["sku"], conv_used["key"].astype(str)):
        if sku not in named:
            rows.append((sku, key.rsplit("/", 1)[-1], "file name", "used", "", "", key))
    df = pd.DataFrame(rows, columns=PACKSHOT_REPORT_COLUMNS)
    return df.sort_values(["sku", "source"], kind="stable").reset_index(drop=True)


def _product_skus(products: pd.DataFrame | None) -> set[str] | None:
    if products is None:
        return None
    if "sku" not in products.columns:
        raise ValueError("products has no 'sku' column")
    s = products["sku"].dropna().astype(str).str.strip()
    return set(s[s != ""])


def clean_catalog(manifest: pd.DataFrame, products: pd.DataFrame | None, out_dir: str | os.PathLike,
                  cfg: CleanConfig | None = None, progress: bool = False) -> CleanResult:
    """Inspect every manifest row, apply the per-file and catalog rules, normalise what needs it.

    The run never stops on a bad file. Output order is deterministic (sorted by sku, then key).
    ``stats`` keys: files_in, files_kept, files_dropped, share_dropped, skus_in, skus_kept, skus_dropped,
    normalised, dropped_by_reason, skus_dropped_by_reason, cross_sku_duplicate_groups, bytes_in,
    seconds, images_per_s, workers, backend.
    """
    t0 = time.perf_counter()
    cfg = cfg or CleanConfig()
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}")
    out_dir = Path(out_dir)
    known = _product_skus(products)

    img = manifest.copy()
    img["sku"] = img["sku"].astype(str).str.strip()
    img["key"] = img["key"].astype(str)
    img = img.sort_values(["sku", "key"], kind="mergesort").reset_index(drop=True)
    n = len(img)
    named_packshots, bad_packshot_cells = contract.packshot_names(products)
    shot_rank = _packshot_ranks(img, named_packshots)  # 0 named, 1 packshot.<ext>, 2 other
    etags = img["etag"].tolist() if cfg.verify_etag else [None] * n
    items = list(zip(img["path"].astype(str).tolist(), etags))
    min_n = cfg.min_index_images  # below this a SKU is dropped; below min_images_per_sku it is index-only
    min_train = cfg.min_images_per_sku
    timings: dict[str, float] = {}

    Image.init()  # register all plugins once, before any worker thread opens a file
    with _Runner(cfg, n) as runner, _batch_warnings():
        t = time.perf_counter()
        reports: list[ImageReport] = runner.map(
            partial(_inspect_chunk, cfg=cfg), items, _crash_inspect, progress, "inspect images"
        )
        timings["inspect"] = time.perf_counter() - t
        reason = np.array([r.reason for r in reports], dtype=object)
        detail = np.array([r.detail for r in reports], dtype=object)
        img["sha256"] = pd.array([r.sha256 for r in reports], dtype="string")
        img["width"] = pd.array([r.width for r in reports], dtype="Int64")
        img["height"] = pd.array([r.height for r in reports], dtype="Int64")
        img["format"] = pd.array([r.format for r in reports], dtype="string")
        img["mode"] = pd.array([r.mode for r in reports], dtype="string")
        img["exif_orientation"] = pd.array([r.exif_orientation for r in reports], dtype="Int64")
        needs = np.array([r.needs_normalisation for r in reports], dtype=bool)
        file_ok = reason == ""
        file_ok_per_sku = img.loc[file_ok].groupby("sku").size()

        # 1. image filed under a SKU that products.csv does not know
        if known is not None:
            m = file_ok & ~img["sku"].isin(known).to_numpy()
            reason[m] = UNKNOWN_SKU
            detail[m] = "SKU not in products.csv"

        # 2. identical bytes under 2+ SKUs (rule: cfg.cross_sku_duplicates)
        ok = reason == ""
        sub = img.loc[ok, ["sku", "sha256"]]
        skus_by_sha = sub.groupby("sha256")["sku"].agg(lambda s: sorted(set(s)))
        skus_by_sha = skus_by_sha[skus_by_sha.map(len) > 1]
        cross_groups = len(skus_by_sha)
        if cross_groups and cfg.cross_sku_duplicates != "keep_all":
            for idx, sku, sha in sub[sub["sha256"].isin(skus_by_sha.index)].itertuples(name=None):
                skus = skus_by_sha[sha]
                if cfg.cross_sku_duplicates == "keep_first" and sku == skus[0]:
                    continue
                others = [s for s in skus if s != sku]
                reason[idx] = DUPLICATE_ACROSS_SKUS
                detail[idx] = f"identical bytes also filed under SKU(s) {', '.join(others[:10])}" + (
                    f" (+{len(others) - 10} more)" if len(others) > 10 else ""
                )

        # 3. identical bytes twice in one SKU: keep the packshot's copy, else the first by key order
        ok = reason == ""
        sub = (img.loc[ok, ["sku", "sha256", "key"]].assign(_rank=shot_rank[ok])
               .sort_values(["sku", "_rank", "key"], kind="stable")[["sku", "sha256", "key"]])
        dup = sub.duplicated(["sku", "sha256"], keep="first")
        if dup.any():
            first_key = sub[~dup].set_index(["sku", "sha256"])["key"]
            for idx, sku, sha, _key in sub[dup].itertuples(name=None):
                reason[idx] = DUPLICATE_IN_SKU
                detail[idx] = f"same bytes as {first_key[(sku, sha)]}"

        # 4. normalise the images that need it, for SKUs that can still reach min_index_images
        ok = reason == ""
        usable = img.loc[ok].groupby("sku").size()
        enough = img["sku"].map(usable).fillna(0).to_numpy() >= min_n
        cand = ok & needs & enough
        clean_path = np.where(ok, img["path"].astype(str).to_numpy(), None).astype(object)
        normalised = np.zeros(n, dtype=bool)
        t = time.perf_counter()
        if cand.any():
            idxs = np.flatnonzero(cand)
            items2 = list(zip(img["path"].astype(str).to_numpy()[idxs], img["sha256"].to_numpy()[idxs]))
            res = runner.map(partial(_normalise_chunk, cfg=cfg, out_dir=str(out_dir)), items2, _crash_normalise,
                             progress, "normalise images")
            for idx, (p, why, err) in zip(idxs, res):
                if p is not None:
                    clean_path[idx] = p
                    normalised[idx] = True
                else:
                    reason[idx] = why
                    detail[idx] = err
                    clean_path[idx] = None
        timings["normalise"] = time.perf_counter() - t

    # 5. SKU level: unknown SKUs, SKUs left with no (or < min_index_images) usable image, roles
    ok = reason == ""
    usable = img.loc[ok].groupby("sku").size()
    files_per_sku = img.groupby("sku").size()
    manifest_skus = set(img["sku"])
    all_skus = sorted(manifest_skus | (known or set()))
    sku_rows = []
    too_few: dict[str, int] = {}
    for sku in all_skus:
        nf = int(files_per_sku.get(sku, 0))
        u = int(usable.get(sku, 0))
        if known is not None and sku not in known:
            sku_rows.append((sku, UNKNOWN_SKU, f"not in products.csv ({nf} file(s) in manifest)",
                             int(file_ok_per_sku.get(sku, 0))))
        elif u < min_n:
            too_few[sku] = u
            why = ("in products.csv but no image in the manifest" if nf == 0
                   else f"{u} usable image(s) of {nf} file(s) < min_index_images {min_n}")
            sku_rows.append((sku, SKU_TOO_FEW_IMAGES, why, u))
    m = ok & img["sku"].isin(too_few).to_numpy()
    for idx in np.flatnonzero(m):
        sku = img.at[idx, "sku"]
        reason[idx] = SKU_TOO_FEW_IMAGES
        detail[idx] = f"SKU has only {too_few[sku]} usable image(s) < min_index_images {min_n}"
        clean_path[idx] = None
    normalised[m] = False  # a normalised copy may exist on disk, but it is not part of the clean set

    kept_mask = reason == ""
    # the SKU's packshot: its best-ranked kept candidate (named file, else packshot.<ext>; first by key)
    cand = kept_mask & (shot_rank < 2)
    order = (pd.DataFrame({"sku": img["sku"].to_numpy()[cand], "rank": shot_rank[cand]}, index=np.flatnonzero(cand))
             .sort_values(["sku", "rank"], kind="stable"))
    chosen = np.zeros(n, dtype=bool)
    chosen[order.index[~order["sku"].duplicated()].to_numpy(dtype=int)] = True
    img["normalised"] = normalised
    img["clean_path"] = pd.array(clean_path, dtype="string")
    img["status"] = np.where(kept_mask, "kept", "dropped")
    img["reason"] = reason.astype(str)
    img["detail"] = detail.astype(str)
    img["packshot"] = chosen
    packshots = _packshot_report(img, shot_rank, chosen, named_packshots, bad_packshot_cells)

    extra = [c for c in manifest.columns if c not in MANIFEST_COLUMNS and c != "packshot"]
    kept_cols = [*MANIFEST_COLUMNS, *extra, "sha256", "width", "height", "format", "mode", "normalised", "clean_path",
                 "packshot"]
    kept = img.loc[kept_mask, kept_cols].reset_index(drop=True)
    for c in ("width", "height"):
        kept[c] = kept[c].astype("int64")
    kept["clean_path"] = kept["clean_path"].astype(str)
    per_sku = kept.groupby("sku").size()
    kept["role"] = np.where(kept["sku"].map(per_sku).to_numpy() >= min_train, "train", "index")
    img["role"] = img["sku"].map(dict(zip(kept["sku"], kept["role"]))).where(kept_mask, None)
    sku_roles = (per_sku.rename("usable_images").reset_index()
                 .assign(role=lambda d: np.where(d["usable_images"] >= min_train, "train", "index")))
    sku_roles["usable_images"] = sku_roles["usable_images"].astype("int64")
    dropped_files = img.loc[~kept_mask, ["sku", "key", "reason", "detail"]].reset_index(drop=True)
    dropped_skus = pd.DataFrame(sku_rows, columns=["sku", "reason", "detail", "usable_images"])
    dropped_skus["usable_images"] = dropped_skus["usable_images"].astype("int64")

    seconds = time.perf_counter() - t0
    n_drop = int((~kept_mask).sum())
    stats: dict[str, Any] = {
        "files_in": n,
        "files_kept": n - n_drop,
        "files_dropped": n_drop,
        "share_dropped": (n_drop / n) if n else 0.0,
        "skus_in": len(all_skus),
        "skus_kept": len(all_skus) - len(sku_rows),
        "skus_dropped": len(sku_rows),
        "skus_train": int((sku_roles["role"] == "train").sum()),
        "skus_index_only": int((sku_roles["role"] == "index").sum()),
        "files_index_only": int((kept["role"] == "index").sum()),
        "skus_with_packshot": int(chosen.sum()),
        "packshot_problems": int((packshots["status"] != "used").sum()),
        "normalised": int(normalised.sum()),
        "dropped_by_reason": {k: int(v) for k, v in sorted(pd.Series(reason[~kept_mask]).value_counts().items())},
        "skus_dropped_by_reason": {k: int(v) for k, v in sorted(dropped_skus["reason"].value_counts().items())},
        "cross_sku_duplicate_groups": cross_groups,
        "bytes_in": int(pd.to_numeric(img["bytes"], errors="coerce").fillna(0).sum()),
        "seconds": round(seconds, 3),
        "seconds_inspect": round(timings.get("inspect", 0.0), 3),
        "seconds_normalise": round(timings.get("normalise", 0.0), 3),
        "images_per_s": round(n / seconds, 1) if seconds > 0 else None,
        "workers": runner.workers if runner.parallel else 1,
        "backend": cfg.backend if runner.parallel else "serial",
    }
    return CleanResult(images=img, kept=kept, dropped_files=dropped_files, dropped_skus=dropped_skus,
                       stats=stats, config=cfg, sku_roles=sku_roles, packshots=packshots)
