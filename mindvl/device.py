"""Which MindSpore device to run on, and how host arrays become its tensors."""

from __future__ import annotations

import mindspore as ms
import numpy as np

from mindvl.errors import UnsupportedError

DEVICES = ("CPU", "Ascend")


def host_dtype(dtype: str) -> type:
    """The numpy type tensors of `dtype` are built from (bfloat16 has none: float32, converted by MindSpore)."""
    return {"float16": np.float16, "int32": np.int32}.get(dtype, np.float32)


def to_tensor(a: np.ndarray, dtype: str) -> ms.Tensor:
    a = np.ascontiguousarray(a, dtype=host_dtype(dtype))
    # from_numpy shares the array's memory instead of copying it.
    return ms.Tensor.from_numpy(a) if dtype != "bfloat16" else ms.Tensor(a, ms.bfloat16)


def zeros(shape: tuple[int, ...], dtype: str) -> ms.Tensor:
    """A zero tensor: a KV cache before its first write, or a placeholder input for export."""
    return to_tensor(np.zeros(shape, host_dtype(dtype)), dtype)


def select_device(device: str | None = None) -> str:
    """The requested device, else the one this MindSpore package targets (Ascend builds: Ascend), else CPU;
    then make it MindSpore's device."""
    if device is not None and device not in DEVICES:
        raise UnsupportedError(f"device {device!r} is not supported; use 'CPU' or 'Ascend'")
    # Asking the context (not probing backends) keeps MindSpore from logging its missing-plugin warnings.
    chosen = device or ("Ascend" if ms.get_context("device_target") == "Ascend" else "CPU")
    ms.set_device(chosen)
    return chosen


def refuse_bfloat16_on_cpu(dtype: str, device: str) -> None:
    if dtype == "bfloat16" and device == "CPU":
        raise UnsupportedError("bfloat16 has no MindSpore CPU kernels (MatMul, Softmax); run it on Ascend, "
                               "or use float32 or float16 on CPU")
