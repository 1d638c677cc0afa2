"""Loads exported mindvl artifacts and generates: vision → prefill → decode with an in-place KV cache.

Imports only `mindvl.shapes` (host preprocessing, graph declarations) and MindSpore, never the model code.
"""

from mindvl.runtime.runtime import Output, Runtime

__all__ = ["Output", "Runtime"]
