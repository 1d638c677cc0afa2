"""safetensors files read and written with numpy alone, bfloat16 included.

The published Qwen2-VL checkpoints are bfloat16, which numpy cannot represent: reading widens bf16 to float32
bit-exactly, writing rounds float32 to bf16 to nearest-even. Tensors are written one at a time, so a
multi-gigabyte file never has to be assembled in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import reprlib
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mindvl.errors import MindVLError

_READ = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_CHUNK = 1 << 26  # bytes per read when a file is read whole
_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers too
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


def _header_problem(header: Any, data_size: int) -> str | None:
    """Why `header` does not describe tensors that fit `data_size` bytes of data without overlapping, or None."""
    if not isinstance(header, dict):
        return f"its header is {reprlib.repr(header)}, not a JSON object"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"tensor {name!r} is {reprlib.repr(info)}, not an object with dtype, shape and data_offsets"
        if not isinstance(info.get("dtype"), str):
            return f"tensor {name!r} has dtype {reprlib.repr(info.get('dtype'))}, not a name such as F32"
        shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info["dtype"]
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            return f"tensor {name!r} has shape {reprlib.repr(shape)}, not a list of integers >= 0"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_size):
            return (f"tensor {name!r} has data_offsets {reprlib.repr(offsets)}, not [begin, end] with "
                    f"0 <= begin <= end <= {data_size} (the size of the data)")
        # Python integers: a shape whose element count overflows int64 is just a size that does not match.
        if dtype in _READ and math.prod(shape) * np.dtype(_READ[dtype]).itemsize != offsets[1] - offsets[0]:
            return (f"tensor {name!r} of shape {reprlib.repr(shape)} {dtype} does not fill its data_offsets "
                    f"{offsets}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans[:-1], spans[1:], strict=True):
        if begin < end:
            return f"tensors {first!r} and {second!r} overlap"
    return None


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _widened(a: np.ndarray) -> np.ndarray:
    """A tensor as stored, with bf16 (read as its uint16 bits) widened to float32."""
    return (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a


def _header(path: Path, error: type[MindVLError], fix: str) -> tuple[dict[str, Any], int, int]:
    """The checked header of a safetensors file (without its metadata), where its data starts, and the file's
    size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                raise ValueError(f"its header claims {header_len} bytes, the file has {size}")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path} is not a readable safetensors file ({e}); {fix}") from None
    data_start = 8 + header_len
    problem = _header_problem(header, size - data_start)
    if problem:
        raise error(f"{path} is truncated or corrupt: {problem}; {fix}")
    header.pop("__metadata__", None)
    return header, data_start, size


def read_safetensors(path: Path, error: type[MindVLError], fix: str, mapped: bool = True,
                     sha256: str | None = None, widen: bool = True) -> dict[str, np.ndarray]:
    """All float tensors of one file (bf16 widened to float32, or with `widen=False` kept as uint16 bits for
    slicing before widening); `error(..., fix)` if unreadable.

    mapped: views into a memory map of the file (pages are read when used). Else the file is read into memory
    once — checked against `sha256` in the same pass when given — and the tensors are views into it, so memory
    holds them once and no second pass is needed to verify them. The header is checked before any data is read.
    """
    header, data_start, size = _header(path, error, fix)
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mapped else _read_whole(path, size, sha256, error, fix)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype = _READ.get(info["dtype"])
        if dtype is None:
            continue
        begin, end = (data_start + o for o in info["data_offsets"])
        arr = raw[begin:end].view(dtype).reshape(info["shape"])
        out[name] = _widened(arr) if widen else arr
    return out


def _pread_into(fd: int, buffer: np.ndarray, offset: int) -> None:
    view = memoryview(buffer).cast("B")
    while view:  # one read returns at most ~2 GB on Linux
        done = os.preadv(fd, [view[:_CHUNK]], offset)
        if not done:
            raise OSError(f"the file ends before byte {offset + len(view)}")
        view, offset = view[done:], offset + done


def read_slices(path: Path, index: dict[str, tuple[slice, ...]], error: type[MindVLError],
                fix: str) -> dict[str, np.ndarray]:
    """One block of each named 1-D or 2-D tensor (rows, and columns, as unit-step slices; bf16 widened),
    read with positioned reads into memory of its own: a process reading a slice of a weights file holds the slice
    and nothing else, where a memory map would also keep every page it touched counted as its own."""
    header, data_start, _ = _header(path, error, fix)
    out = {}
    try:
        with path.open("rb") as f:
            for name, where in index.items():
                info = header[name]
                dtype, shape = np.dtype(_READ[info["dtype"]]), info["shape"]
                rows, columns = where[0], (where[1] if len(shape) > 1 else slice(0, 1))
                width = shape[1] if len(shape) > 1 else 1
                begin = data_start + info["data_offsets"][0] + rows.start * width * dtype.itemsize
                block = np.empty((rows.stop - rows.start, columns.stop - columns.start), dtype)
                if columns == slice(0, width):  # whole rows: one read
                    _pread_into(f.fileno(), block, begin)
                else:  # a block of columns: a read per row
                    for row in range(len(block)):
                        _pread_into(f.fileno(), block[row], begin + (row * width + columns.start) * dtype.itemsize)
                out[name] = _widened(block if len(shape) > 1 else block.reshape(-1))
    except OSError as e:
        raise error(f"{path} cannot be read ({e}); {fix}") from None
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
