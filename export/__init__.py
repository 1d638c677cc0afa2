"""Bucketed static-shape export of Qwen2-VL to MindIR."""

from mindvl.export.exporter import export_artifacts

__all__ = ["export_artifacts"]
