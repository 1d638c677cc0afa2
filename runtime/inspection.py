"""`mindvl inspect`: what an artifact folder holds, and with --verify, that all of it is intact and loads."""

from __future__ import annotations

from pathlib import Path

from mindvl.shapes.manifest import Manifest


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MB"


def inspect_artifacts(folder: str | Path, verify: bool = False) -> str:
    folder = Path(folder)
    m = Manifest.read(folder)
    cfg = m.config
    b = m.buckets
    weights = m.files[m.weights["file"]]["bytes"]
    graph_bytes = {g.file: m.files[g.file]["bytes"] for g in m.graphs}
    tokenizer = sum(f["bytes"] for name, f in m.files.items() if name.startswith("tokenizer/"))
    lines = [
        f"{folder}: mindvl {m.mindvl_version}, MindSpore {m.mindspore_version}, {m.dtype}",
        f"model: Qwen2-VL, {cfg.text.num_hidden_layers} layers, hidden {cfg.text.hidden_size}, "
        f"vocab {cfg.text.vocab_size}, vision {cfg.vision.depth} blocks × {cfg.vision.embed_dim}",
        f"buckets: images {b.get('images', [])}, videos {b.get('videos', [])}, batch {b['batch']}, "
        f"prefill {b['prefill']}, cache {b['cache']}",
        *([f"tensor parallel: tp {m.tp} (generate and serve start {m.tp} workers through msrun)"] if m.tp > 1 else []),
        f"size: weights {_mb(weights)} (once), {len(m.graphs)} graphs {_mb(sum(graph_bytes.values()))}, "
        f"tokenizer {_mb(tokenizer)}",
        "graphs:",
        *(f"  {g.name:<28} {g.kind:<8} {g.format:<7}{graph_bytes[g.file] / 1024:8.1f} KB" for g in m.graphs),
    ]
    if verify:
        import mindspore as ms

        from mindvl.runtime.artifacts import load_graph, read_weights

        if "mindir" in m.formats:
            m.check_made_by(folder, ms.__version__)
        graph_files = {g.file for g in m.graphs}
        for relative in m.files:
            if relative not in graph_files:
                m.check_file(folder, relative)
        read_weights(folder, m, mapped=True)  # its header and tensors; hashed just above
        for g in m.graphs:  # each checks the graph file's hash too
            if g.format == "onnx":
                from mindvl.runtime.onnx_graphs import verify_onnx

                verify_onnx(folder, m, g)
            else:
                load_graph(folder, m, g)
        lines.append(f"verified: {len(m.files)} files match their sha256, {len(m.graphs)} graphs load")
    return "\n".join(lines)
