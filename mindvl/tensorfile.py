"""safetensors files read and written with numpy alone, bfloat16 included.

The published Qwen2-VL checkpoints are bfloat16, which numpy cannot represent: reading widens bf16 to float32
bit-exactly, writing rounds float32 to bf16 to nearest-even. Tensors are written one at a time, so a
multi-gigabyte file never has to be assembled in memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from mindvl.errors import MindVLError

_READ = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_CHUNK = 1 << 26  # bytes per read when a file is read whole
_WRITE = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", np.uint16)}


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _read_whole(path: Path, size: int, sha256: str | None, error: type[MindVLError], fix: str) -> np.ndarray:
    """The file's bytes in one array, read once and hashed on the way when `sha256` is to be checked."""
    data, digest = np.empty(size, np.uint8), hashlib.sha256()
    with path.open("rb") as f:
        for start in range(0, size, _CHUNK):
            chunk = memoryview(data[start:start + _CHUNK])
            f.readinto(chunk)
            if sha256:
                digest.update(chunk)
    if sha256 and digest.hexdigest() != sha256:
        raise error(f"{path} does not match its recorded sha256 (corrupt or modified); {fix}")
    return data


def read_safetensors(path: Path, error: type[MindVLError], fix: str, mapped: bool = True,
                     sha256: str | None = None) -> dict[str, np.ndarray]:
    """All float tensors of one file (bf16 widened to float32); `error(..., fix)` if unreadable.

    mapped: views into a memory map of the file (pages are read when used). Else the file is read into memory
    once — checked against `sha256` in the same pass when given — and the tensors are views into it, so memory
    holds them once and no second pass is needed to verify them.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise error(f"{path} is not a readable safetensors file ({e}); {fix}") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mapped else _read_whole(path, size, sha256, error, fix)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype = _READ.get(info["dtype"])
        if dtype is None:
            continue
        begin, end = (data_start + o for o in info["data_offsets"])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end > size or end - begin != count * np.dtype(dtype).itemsize:
            raise error(f"{path} is truncated or corrupt at tensor {name}; {fix}")
        arr = raw[begin:end].view(dtype).reshape(info["shape"])
        out[name] = (arr.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else arr
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> str:
    """Write every tensor converted to `dtype` (float32, float16 or bfloat16), in the given order; returns the
    file's sha256, taken as it is written."""
    tag, stored = _WRITE[dtype]
    header, offset = {}, 0
    for name, a in tensors.items():
        nbytes = int(np.prod(a.shape, dtype=np.int64)) * np.dtype(stored).itemsize
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for part in (struct.pack("<Q", len(blob)) + blob,
                     *(memoryview(_to_bf16_bits(a) if dtype == "bfloat16" else np.ascontiguousarray(a, dtype=stored))
                       .cast("B") for a in tensors.values())):
            digest.update(part)
            f.write(part)
    return digest.hexdigest()
