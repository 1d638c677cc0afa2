"""Which MindSpore device to run on."""

from __future__ import annotations

import mindspore as ms

from mindvl.errors import UnsupportedError

DEVICES = ("CPU", "Ascend")


def select_device(device: str | None = None) -> str:
    """The requested device, else Ascend when this MindSpore build sees one, else CPU."""
    if device is not None:
        if device not in DEVICES:
            raise UnsupportedError(f"device {device!r} is not supported; use 'CPU' or 'Ascend'")
        return device
    return "Ascend" if ms.hal.is_available("Ascend") else "CPU"


def refuse_bfloat16_on_cpu(dtype: str, device: str) -> None:
    if dtype == "bfloat16" and device == "CPU":
        raise UnsupportedError("bfloat16 has no MindSpore CPU kernels (MatMul, Softmax); run it on Ascend, "
                               "or use float32 or float16 on CPU")
