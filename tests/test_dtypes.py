"""float16 runs on CPU in both modes and through export; bfloat16 loads but is refused on CPU; bad dtype or mode
names."""

import functools

import numpy as np
import pytest
from media import PROMPTS
from reference import hf_inputs

from mindvl.errors import UnsupportedError
from mindvl.export import export_artifacts
from mindvl.qwen2vl import load
from mindvl.runtime import Runtime
from mindvl.shapes.buckets import BucketSpec


@functools.cache
def inputs(model_dir):
    got = hf_inputs(model_dir, **PROMPTS["image"])
    return {k: got[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}


def test_float16_graph_and_pynative(model_dir):
    fp32 = load(model_dir).logits(**inputs(model_dir))
    fp16 = load(model_dir, dtype="float16")
    graph, eager = fp16.logits(**inputs(model_dir), mode="graph"), fp16.logits(**inputs(model_dir), mode="pynative")
    assert np.isfinite(graph).all()
    # The graph compiler may order and fuse float16 ops differently from eager execution: the two modes agree
    # within float16 rounding of these large logits (max ~200, where one float16 ulp is 0.125).
    assert np.abs(graph - eager).max() <= 2e-2 * np.abs(graph).max()
    assert (graph.argmax(-1) == eager.argmax(-1)).mean() >= 0.95
    # The fixture's logits are large (std ~48); float16 keeps ~3 significant digits of them.
    assert np.abs(graph - fp32).max() <= 0.05 * np.abs(fp32).max()
    assert (graph.argmax(-1) == fp32.argmax(-1)).mean() >= 0.95


def test_float16_export_gives_float32_logits_within_float16_rounding(model_dir, tmp_path):
    spec = BucketSpec.from_dict({"batch": [1], "prefill": [128], "cache": [256]})
    export_artifacts(model_dir, tmp_path / "fp16", spec, dtype="float16", log=lambda line: None)
    runtime, text = Runtime.load(tmp_path / "fp16"), PROMPTS["text"]["text"]
    out = runtime.generate(text, max_new_tokens=16, keep_logits=True)
    assert len(out.logits) == 16  # the prefill's logits, then 15 decode steps' through the float16 KV cache
    # float32's logits at each step for the same tokens, from one forward over the prompt and what was generated.
    prompt = runtime.processor.prepare(text).model_inputs()["input_ids"]
    full = load(model_dir).logits(np.concatenate([prompt, [out.token_ids[:-1]]], axis=1))[0, prompt.shape[1] - 1:]
    for step, (logits, expected) in enumerate(zip(out.logits, full, strict=True)):
        # float16 keeps ~3 significant digits of these large logits (max ~200, where one float16 ulp is 0.125):
        # measured within 0.9% of the largest at every step.
        err, scale = np.abs(logits - expected).max(), np.abs(expected).max()
        assert err <= 2e-2 * scale, f"step {step}: max|Δ| {err:.3g} > 2e-2 × max|logit| {scale:.3g}"
    assert out.token_ids[0] == full[0].argmax()  # float32's top-2 margin there is ~13 logits


def test_bfloat16_loads_and_is_refused_on_cpu(model_dir):
    model = load(model_dir, dtype="bfloat16", device="CPU")
    assert str(model.text_weights[0].dtype) == "BFloat16"
    with pytest.raises(UnsupportedError, match="bfloat16 has no MindSpore CPU kernels.*Ascend.*float32"):
        model.logits(**inputs(model_dir))


def test_unknown_dtype_and_mode(model_dir):
    with pytest.raises(UnsupportedError, match="dtype 'int8' is not supported"):
        load(model_dir, dtype="int8")
    with pytest.raises(UnsupportedError, match="mode 'eager' is not supported"):
        load(model_dir).logits(**inputs(model_dir), mode="eager")
