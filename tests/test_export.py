"""What `mindvl export` writes: one graph per bucket, weights once, a manifest that round-trips."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from mindvl.apps.cli import main
from mindvl.errors import ExportError
from mindvl.export import exporter
from mindvl.shapes.buckets import BucketSpec
from mindvl.shapes.config import read_config
from mindvl.shapes.graphs import GraphSpec, all_graphs
from mindvl.shapes.manifest import Manifest, file_sha256
from mindvl.shapes.weights import manifest_weights, stored_weights


def test_one_graph_per_bucket_and_weights_once(exported):
    for preset in ("tiny", "tiny-gqa3"):
        model_dir, artifacts = exported(preset)
        manifest = Manifest.read(artifacts)
        cfg = read_config(model_dir)
        expected = all_graphs(cfg, BucketSpec.preset("tiny"), "float32")
        assert [g.name for g in manifest.graphs] == [g.name for g in expected]
        # tiny preset: 4 images + 1 video + 6 (prefill, cache) pairs with prefill <= cache + 2 decode = 13
        assert len(expected) == 13 and {g.kind for g in expected} == {"vision", "video", "prefill", "decode"}
        weights = load_file(artifacts / "weights.safetensors")
        assert ("text.lm_head.weight" in weights) == (not cfg.text.tie_word_embeddings)
        weight_bytes = sum(a.nbytes for a in weights.values())
        assert (artifacts / "weights.safetensors").stat().st_size < weight_bytes + 64 * 1024
        for graph in manifest.graphs:
            # Weights and KV cache are inputs: a graph file holds the computation only.
            assert (artifacts / graph.file).stat().st_size < 200 * 1024, graph.name
        assert {p.name for p in (artifacts / "tokenizer").iterdir()} == {
            "chat_template.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json"}


def test_manifest_round_trip(exported, tmp_path):
    _, artifacts = exported("tiny")
    manifest = Manifest.read(artifacts)
    on_disk = json.loads((artifacts / "manifest.json").read_text())
    assert manifest.to_dict() == on_disk
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    for graph in manifest.graphs:
        assert GraphSpec.from_dict(graph.to_dict()) == graph
    assert BucketSpec.from_dict(manifest.buckets) == BucketSpec.preset("tiny")
    for relative, entry in manifest.files.items():
        assert file_sha256(artifacts / relative) == entry["sha256"]
    prefill = manifest.graph("prefill_b1_s128_c256")
    assert [t.name for t in prefill.inputs] == ["embeds", "position_ids", "cache_positions", "mask", "logits_index"]
    assert prefill.inputs[3].shape == (1, 128, 256) and prefill.outputs[0].shape == (1, 1, 320)


def test_manifest_records_the_declared_weights(exported):
    """Each weight's name, shape, dtype and split, in graph-input order, as declared; the file holds each once."""
    for preset in ("tiny", "tiny-gqa3"):
        model_dir, artifacts = exported(preset)
        cfg, weights = read_config(model_dir), Manifest.read(artifacts).weights
        assert weights == {"file": "weights.safetensors", **manifest_weights(cfg, "float32")}
        stored = load_file(artifacts / "weights.safetensors")
        assert {n: a.shape for n, a in stored.items()} == {w.name: w.shape for w in stored_weights(cfg)}
    tiny = Manifest.read(exported("tiny")[1]).weights
    assert tiny["groups"]["text"][1] == {"name": "text.layers.0.q.weight", "shape": [64, 64], "dtype": "float32",
                                         "split": "column"}


def test_export_refuses_a_weight_the_declaration_does_not_expect(exported, tmp_path, monkeypatch):
    """What the loader hands over is checked again before any graph is exported: the manifest will vouch for it."""
    model_dir, _ = exported("tiny")
    load_weights = exporter.load_weights

    def one_wrong(model_dir, cfg):
        arrays = load_weights(model_dir, cfg)
        return {**arrays, "text.layers.1.up.weight": np.zeros((96, 64), np.float32)}

    monkeypatch.setattr(exporter, "load_weights", one_wrong)
    with pytest.raises(ExportError, match=r"^weight text\.layers\.1\.up\.weight is \[96, 64\] float32, but the model "
                                          r"config declares \[128, 64\] float32; check that the checkpoint"):
        exporter.export_artifacts(model_dir, tmp_path / "out", BucketSpec.preset("tiny"), log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_inspect_reports_and_verifies(exported, capsys):
    _, artifacts = exported("tiny")
    assert main(["inspect", str(artifacts), "--verify"]) == 0
    report = capsys.readouterr().out
    assert "13 graphs" in report and "decode_b1_c512" in report and "verified: " in report


def test_float16_and_bfloat16_exports(exported, tmp_path):
    from mindvl.errors import UnsupportedError
    from mindvl.export import export_artifacts
    from mindvl.runtime import Runtime

    model_dir, _ = exported("tiny")
    spec = BucketSpec.from_dict({"batch": [1], "prefill": [64], "cache": [128]})
    half = export_artifacts(model_dir, tmp_path / "fp16", spec, dtype="float16", log=lambda line: None)
    stored = load_file(tmp_path / "fp16" / "weights.safetensors")
    assert half.dtype == "float16" and stored["text.norm.weight"].dtype == np.float16
    out = Runtime.load(tmp_path / "fp16").generate("Hello", max_new_tokens=4)
    assert 1 <= len(out.token_ids) <= 4
    export_artifacts(model_dir, tmp_path / "bf16", spec, dtype="bfloat16", log=lambda line: None)
    assert "bfloat16" in (tmp_path / "bf16" / "manifest.json").read_text()
    try:
        Runtime.load(tmp_path / "bf16", device="CPU")
        raise AssertionError("bfloat16 artifacts must be refused on CPU")
    except UnsupportedError as e:
        assert "bfloat16" in str(e) and "Ascend" in str(e)
