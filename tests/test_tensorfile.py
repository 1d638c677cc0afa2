"""Our numpy safetensors reader/writer against the safetensors library and torch's bfloat16 rounding."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from mindvl.errors import CheckpointError
from mindvl.tensorfile import read_safetensors, read_slices, write_safetensors

VALUES = np.array([1.0, -2.5, 3.140625, 1e-3, 65504.0, -0.0, 1.00390625, 1.01171875, 3e38, 1e-40], np.float32)


def test_bf16_is_widened_bit_exactly(tmp_path):
    bits = (VALUES.view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"x": {"dtype": "BF16", "shape": [len(bits)], "data_offsets": [0, 2 * len(bits)]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bits.tobytes())
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(read_safetensors(path, CheckpointError, "fix")["x"], expected)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_written_files_read_back_with_the_safetensors_library(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {"b.weight": rng.standard_normal((3, 5)).astype(np.float32),
               "a": rng.standard_normal(7).astype(np.float32)}
    write_safetensors(tmp_path / "w.safetensors", tensors, dtype)
    theirs = load_file(tmp_path / "w.safetensors")
    ours = read_safetensors(tmp_path / "w.safetensors", CheckpointError, "fix")
    for name, value in tensors.items():
        np.testing.assert_array_equal(theirs[name], value.astype(dtype))
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_bfloat16_rounds_like_torch(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", {"x": VALUES}, "bfloat16")
    theirs = load_torch(tmp_path / "w.safetensors")["x"]
    assert theirs.dtype == torch.bfloat16
    expected = torch.from_numpy(VALUES).to(torch.bfloat16)
    assert torch.equal(theirs, expected)
    np.testing.assert_array_equal(read_safetensors(tmp_path / "w.safetensors", CheckpointError, "fix")["x"],
                                  expected.float().numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_read_slices_reads_the_blocks_a_rank_asks_for(tmp_path, dtype):
    rng = np.random.default_rng(1)
    tensors = {"w": rng.standard_normal((6, 10)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, tensors, dtype)
    whole = read_safetensors(path, CheckpointError, "fix")
    index = {"w": (slice(2, 4), slice(0, 10)), "b": (slice(3, 6),)}  # rows: one read each
    got = read_slices(path, index, CheckpointError, "fix")
    np.testing.assert_array_equal(got["w"], whole["w"][2:4])
    np.testing.assert_array_equal(got["b"], whole["b"][3:6])
    columns = read_slices(path, {"w": (slice(0, 6), slice(5, 10))}, CheckpointError, "fix")["w"]  # a read per row
    np.testing.assert_array_equal(columns, whole["w"][:, 5:10])
    assert columns.flags.writeable and columns.dtype == (np.float16 if dtype == "float16" else np.float32)
    path.write_bytes(path.read_bytes()[:-8])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt.*fix"):
        read_slices(path, index, CheckpointError, "fix")
