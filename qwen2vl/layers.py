"""Functional building blocks shared by the vision and text cells.

Weights arrive as plain tensor arguments (never captured Parameters) so that an exported graph holds no
weights and every bucket reads the same single copy. Only `mindspore.ops` primitives with both CPU and
Ascend kernels are used (many `mindspore.mint` ops have no CPU kernel).
"""

from __future__ import annotations

from mindspore import Tensor, ops
from mindspore import dtype as mstype

_matmul_t = ops.MatMul(transpose_b=True)
_bias_add = ops.BiasAdd()


def full(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    """`a` broadcast to `shape`, explicitly.

    Measured on MindSpore 2.10's CPU backend: a binary op that broadcasts implicitly keeps its output buffer for
    the whole graph run (a 32-block vision encoder at 1024 patches grew by ~20 GB), while the same op on an
    explicit `broadcast_to` frees it as usual. Every broadcasting op in the cells goes through here.
    """
    return ops.broadcast_to(a, shape)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) with the HF [out, in] weight layout, for inputs of any rank."""
    lead = x.shape[:-1]
    y = _matmul_t(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        y = _bias_add(y, bias)  # a dedicated op: see `full`
    return y.reshape(lead + (weight.shape[0],))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Statistics in float32 whatever the model dtype, as the reference does.
    h = x.astype(mstype.float32)
    h = h * full(ops.rsqrt(ops.mean(h * h, -1, keep_dims=True) + eps), h.shape)
    h = h.astype(x.dtype)
    return full(weight, h.shape) * h


_layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-6)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The fused primitive (one pass instead of six); its CPU kernel accumulates in float32 for float16 too.
    Qwen2-VL's vision norms all use eps 1e-6."""
    return _layer_norm(x, weight, bias)[0]


def rotate_half(x: Tensor) -> Tensor:
    first, second = ops.split(x, x.shape[-1] // 2, -1)  # see vision.py on StridedSlice
    return ops.concat((-second, first), -1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * full(cos, x.shape) + rotate_half(x) * full(sin, x.shape)


def quick_gelu(x: Tensor) -> Tensor:
    return x * ops.sigmoid(1.702 * x)


def silu(x: Tensor) -> Tensor:
    return x * ops.sigmoid(x)


def softmax_f32(scores: Tensor, dtype: mstype.Type) -> Tensor:
    """Softmax in float32 whatever the model dtype, cast back, as the reference does."""
    return ops.softmax(scores.astype(mstype.float32), -1).astype(dtype)
