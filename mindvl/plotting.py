"""matplotlib for the reports that draw (`mindvl bench --plot`, `mindvl plan --plot`): an optional dependency."""

from __future__ import annotations

from typing import Any

from mindvl.errors import MindVLError


def pyplot() -> Any:
    """matplotlib.pyplot, drawing to files only (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MindVLError("--plot needs matplotlib: pip install matplotlib, or leave --plot out") from None
    return plt
