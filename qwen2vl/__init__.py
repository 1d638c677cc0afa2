"""Qwen2-VL as MindSpore cells that run on CPU and Ascend, in graph mode or pynative."""

from mindvl.qwen2vl.model import Generation, Qwen2VL, load
from mindvl.shapes.config import ModelConfig, TextConfig, VisionConfig, read_config

__all__ = ["Generation", "ModelConfig", "Qwen2VL", "TextConfig", "VisionConfig", "load", "read_config"]
