"""mindvl: Qwen2-VL as graph-mode MindSpore MindIR at bucketed static shapes."""

__version__ = "0.1.0"
