"""Test support: random Qwen2-VL checkpoints in the real file formats and sample media, made locally. Imported
by the tests, the benchmarks and the demo only, never by the runtime, the exporter or the server."""
