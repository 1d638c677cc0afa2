"""float16 runs on CPU in both modes; bfloat16 loads but is refused on CPU; bad dtype or mode names."""

import functools

import numpy as np
import pytest
from media import PROMPTS
from reference import hf_inputs

from mindvl.errors import UnsupportedError
from mindvl.qwen2vl import load


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
