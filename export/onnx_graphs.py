"""The graphs of shapes/graphs.py as ONNX (opset 18), op for op what the MindSpore cells compute (qwen2vl/), built
with `onnx.helper` — MindSpore's own ONNX exporter cannot take these cells (no Erf, Rsqrt or ScatterUpdate, opset 11
only).

As in the MindIR graphs, the weights and the KV cache are graph inputs, never initializers: a .onnx file holds only
computation, and the runtime binds the one copy of the weights to every graph. A text graph also returns each cache
with this call's slots written (`shapes.graphs.present_name`); the runtime binds that output to its input's buffer, so
onnxruntime's ScatterND writes the cache in place. float32 only: onnxruntime's CPU kernels cover it fully.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mindvl.errors import UnsupportedError
from mindvl.qwen2vl.text import mrope_table
from mindvl.shapes.config import ModelConfig
from mindvl.shapes.graphs import GraphSpec, TensorSpec, present_name
from mindvl.shapes.weights import Weight, text_weights, vision_weights

OPSET = 18
_TYPES = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32}


def onnx_graph(cfg: ModelConfig, spec: GraphSpec, weights: Sequence[Weight]) -> onnx.ModelProto:
    """`spec` as an ONNX model whose inputs are its declared inputs, caches and `weights` (its group's, by name)."""
    if any(t.dtype not in _TYPES for t in (*spec.inputs, *spec.caches, *spec.outputs)):
        raise UnsupportedError(f"{spec.name}: ONNX export writes float32 graphs; export with --dtype float32, or "
                               f"--format mindir for float16 and bfloat16")
    g = _Graph()
    outputs = [_value(spec.outputs[0])] + [_value(TensorSpec(present_name(c.name), c.shape, c.dtype))
                                           for c in spec.caches]
    if spec.kind in ("vision", "video"):
        out, presents = _vision(g, cfg, spec), {}
    else:
        out, presents = _text(g, cfg, spec)
    g.rename({**presents, out: spec.outputs[0].name})
    inputs = [_value(t) for t in (*spec.inputs, *spec.caches)]
    inputs += [_value(TensorSpec(w.name, w.shape, "float32")) for w in weights]
    graph = helper.make_graph(g.nodes, spec.name, inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mindvl")


def _value(t: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(t.name, _TYPES[t.dtype], list(t.shape))


class _Graph:
    """Nodes in order; each op returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value: np.ndarray | float | Sequence[int]) -> str:
        """A constant: a float scalar as float32, integers as int64, an array as it is."""
        if isinstance(value, float):
            array = np.asarray(value, np.float32)
        elif isinstance(value, np.ndarray):
            array = value
        else:
            array = np.asarray(value, np.int64)
        out = f"const_{len(self.nodes)}"
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array)))
        return out

    def split(self, x: str, sizes: Sequence[int], axis: int = -1) -> list[str]:
        outs = [f"split_{len(self.nodes)}_{i}" for i in range(len(sizes))]
        self.nodes.append(helper.make_node("Split", [x, self.const(list(sizes))], outs, axis=axis))
        return outs

    def rename(self, names: dict[str, str]) -> None:
        """Give some outputs the names the graph's declaration asks for."""
        for node in self.nodes:
            node.output[:] = [names.get(o, o) for o in node.output]
            node.input[:] = [names.get(i, i) for i in node.input]

    # Building blocks, as qwen2vl/layers.py

    def reshape(self, x: str, *shape: int) -> str:
        return self.op("Reshape", x, self.const(list(shape)))

    def linear(self, x: str, weight: str, bias: str | None = None) -> str:
        """x [N, in] @ weight [out, in].T (+ bias), as the HF layout stores it."""
        return self.op("Gemm", x, weight, *([bias] if bias else []), transB=1)

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        mean = self.op("ReduceMean", self.op("Mul", x, x), self.const([-1]), keepdims=1)
        inverse = self.op("Reciprocal", self.op("Sqrt", self.op("Add", mean, self.const(float(eps)))))
        return self.op("Mul", weight, self.op("Mul", x, inverse))

    def layer_norm(self, x: str, weight: str, bias: str) -> str:
        return self.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=1e-6)

    def rotary_tables(self, cos: str, sin: str, d: int, scale: float) -> tuple[str, str, str, str]:
        """cos and sin for `rotary`, made once per graph: sin with its first half negated (rotate_half's sign), and
        both times `scale` for the queries (the attention scale, folded in: no multiply per layer)."""
        signed = self.op("Mul", sin, self.const(np.repeat(np.float32([-1, 1]), d // 2)))
        return cos, signed, self.op("Mul", cos, self.const(scale)), self.op("Mul", signed, self.const(scale))

    def rotary(self, x: str, cos: str, signed_sin: str, shape: Sequence[int]) -> str:
        """x * cos + rotate_half(x) * sin, x of `shape` (head dim last); the sign is in `signed_sin`, so the halves
        are only swapped (no Neg per layer)."""
        x = self.reshape(x, *shape)
        first, second = self.split(x, [shape[-1] // 2] * 2)
        swapped = self.op("Concat", second, first, axis=-1)
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", swapped, signed_sin))

    def sigmoid_gate(self, x: str, slope: float) -> str:
        """x * sigmoid(slope * x): SiLU (1) and quick GELU (1.702)."""
        scaled = x if slope == 1.0 else self.op("Mul", x, self.const(slope))
        return self.op("Mul", x, self.op("Sigmoid", scaled))

    def gelu(self, x: str) -> str:
        """The exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as the merger's reference computes it (no tanh)."""
        erf = self.op("Erf", self.op("Mul", x, self.const(float(1 / math.sqrt(2)))))
        return self.op("Mul", self.op("Mul", x, self.const(0.5)), self.op("Add", erf, self.const(1.0)))


def _vision(g: _Graph, cfg: ModelConfig, spec: GraphSpec) -> str:
    v = cfg.vision
    n, groups, heads, d = spec.inputs[0].shape[0], spec.bucket["groups"], v.num_heads, v.head_dim
    at = vision_weights(v)
    cos, sin, q_cos, q_sin = g.rotary_tables(g.reshape("cos", n, 1, d), g.reshape("sin", n, 1, d), d, d**-0.5)

    def by_group(t: str) -> str:  # [n, heads, d] -> [groups * heads, n / groups, d]
        t = g.op("Transpose", g.reshape(t, groups, n // groups, heads, d), perm=[0, 2, 1, 3])
        return g.reshape(t, groups * heads, n // groups, d)

    x = g.linear("patches", at.patch_embed.weight.name)
    for block in at.blocks:
        w = {role: weight.name for role, weight in block._asdict().items()}
        h = g.layer_norm(x, w["norm1_weight"], w["norm1_bias"])
        qkv = g.linear(h, w["qkv_weight"], w["qkv_bias"])
        q, k, val = g.split(qkv, [v.embed_dim] * 3)
        q = by_group(g.rotary(q, q_cos, q_sin, (n, heads, d)))
        k = by_group(g.rotary(k, cos, sin, (n, heads, d)))
        probs = g.op("Softmax", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 1])), axis=-1)
        out = g.op("MatMul", probs, by_group(val))
        out = g.reshape(g.op("Transpose", g.reshape(out, groups, heads, n // groups, d), perm=[0, 2, 1, 3]), n, -1)
        x = g.op("Add", x, g.linear(out, w["proj_weight"], w["proj_bias"]))
        h = g.layer_norm(x, w["norm2_weight"], w["norm2_bias"])
        mlp = g.linear(g.sigmoid_gate(g.linear(h, w["fc1_weight"], w["fc1_bias"]), 1.702), w["fc2_weight"],
                       w["fc2_bias"])
        x = g.op("Add", x, mlp)
    m = {role: weight.name for role, weight in at.merger._asdict().items()}
    x = g.reshape(g.layer_norm(x, m["norm_weight"], m["norm_bias"]), -1, v.merged_dim)
    return g.linear(g.gelu(g.linear(x, m["fc1_weight"], m["fc1_bias"])), m["fc2_weight"], m["fc2_bias"])


def _text(g: _Graph, cfg: ModelConfig, spec: GraphSpec) -> tuple[str, dict[str, str]]:
    t = cfg.text
    b, s, capacity = spec.bucket["batch"], spec.bucket["seq"], spec.bucket["cache"]
    heads, kvh, groups, d, hidden = t.num_attention_heads, t.num_key_value_heads, t.kv_groups, t.head_dim, t.hidden_size
    at = text_weights(t)
    # M-RoPE: positions [3, B, S] -> angles [B, S, d] through the section table, as TextStep.rotary.
    positions = g.op("Transpose", g.op("Cast", "position_ids", to=TensorProto.FLOAT), perm=[1, 2, 0])
    angle = g.op("MatMul", positions, g.const(mrope_table(t)))
    cos, sin, q_cos, q_sin = g.rotary_tables(*(g.reshape(g.op(f, angle), b, s, 1, d) for f in ("Cos", "Sin")), d,
                                             d**-0.5)
    # Rows of the flattened cache this call writes: (batch, kv head) block start + slot, one index per row.
    base = (np.arange(b * kvh, dtype=np.int64) * capacity).reshape(b, kvh, 1)
    slots = g.reshape(g.op("Cast", "cache_positions", to=TensorProto.INT64), b, 1, s)
    rows = g.op("Unsqueeze", g.op("Add", g.const(base), slots), g.const([-1]))
    mask = g.reshape("mask", b, 1, 1, s, capacity)
    presents = {}
    x = g.reshape("embeds", b * s, hidden)
    for i, layer in enumerate(at.layers):
        w = {role: weight.name for role, weight in layer._asdict().items()}
        h = g.rms_norm(x, w["input_norm_weight"], t.rms_norm_eps)
        q = g.rotary(g.linear(h, w["q_weight"], w["q_bias"]), q_cos, q_sin, (b, s, heads, d))
        k = g.rotary(g.linear(h, w["k_weight"], w["k_bias"]), cos, sin, (b, s, kvh, d))
        val = g.reshape(g.linear(h, w["v_weight"], w["v_bias"]), b, s, kvh, d)
        cache = {}
        for kind, new in (("k", k), ("v", val)):
            written = g.op("ScatterND", f"cache_{kind}_{i}", rows, g.op("Transpose", new, perm=[0, 2, 1, 3]))
            presents[written] = present_name(f"cache_{kind}_{i}")
            cache[kind] = g.reshape(written, b, kvh, capacity, d)
        # Query heads of one kv head stacked along the rows (as TextStep.attention): GQA without copying the cache.
        q = g.reshape(g.op("Transpose", g.reshape(q, b, s, kvh, groups, d), perm=[0, 2, 3, 1, 4]),
                      b, kvh, groups * s, d)
        scores = g.op("MatMul", q, g.op("Transpose", cache["k"], perm=[0, 1, 3, 2]))
        scores = g.op("Add", g.reshape(scores, b, kvh, groups, s, capacity), mask)
        probs = g.reshape(g.op("Softmax", scores, axis=-1), b, kvh, groups * s, capacity)
        out = g.reshape(g.op("MatMul", probs, cache["v"]), b, kvh, groups, s, d)
        out = g.reshape(g.op("Transpose", out, perm=[0, 3, 1, 2, 4]), b * s, heads * d)
        x = g.op("Add", x, g.linear(out, w["o_weight"]))
        h = g.rms_norm(x, w["post_attention_norm_weight"], t.rms_norm_eps)
        gate = g.sigmoid_gate(g.linear(h, w["gate_weight"]), 1.0)
        x = g.op("Add", x, g.linear(g.op("Mul", gate, g.linear(h, w["up_weight"])), w["down_weight"]))
    index = g.op("Expand", g.reshape(g.op("Cast", "logits_index", to=TensorProto.INT64), b, 1, 1),
                 g.const([b, 1, hidden]))
    x = g.reshape(g.op("GatherElements", g.reshape(x, b, s, hidden), index, axis=1), b, hidden)
    head = at.head
    logits = g.linear(g.rms_norm(x, head.norm_weight.name, t.rms_norm_eps), head.lm_head_weight.name)
    return g.reshape(logits, b, 1, t.vocab_size), presents
