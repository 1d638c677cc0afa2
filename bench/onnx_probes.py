"""One-op probes behind BENCHMARKS.md's ONNX section: the vision encoder's largest Gemm and one block's attention,
in onnxruntime as mindvl feeds them and in the variants tried against torch.

    python bench/onnx_probes.py                  # medians of 15 calls, 2 threads, three rounds
    python bench/onnx_probes.py --rounds 1 --calls 5

Gemm [1024, 1280] × [1280, 5120] (the fc1 of a 2B vision block at 448x448): the weight as a graph input (as mindvl
feeds it), as an initializer (which onnxruntime prepacks at load; mindvl's graphs never have one), with the operands
swapped, with the rows split into 2, 4 and 8 Gemms; torch's linear. Attention of [16, 1024, 80] heads: MatMul,
Softmax, MatMul; ONNX's opset-23 Attention op; torch's scaled_dot_product_attention. With OpenVINO's plugin for
onnxruntime installed (onnxruntime-ep-openvino), also the Gemm on it at float32. Needs torch (the test extra).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

M, K, N = 1024, 1280, 5120
HEADS, SEQ, HEAD_DIM = 16, 1024, 80
FLOAT = TensorProto.FLOAT


def session(nodes: list, inputs: dict[str, list[int]], opset: int = 18, initializers: tuple = (),
            options: Any = None) -> Any:
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info("y", FLOAT, None)], initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if options is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), options)


def median_ms(call: Callable[[], Any], calls: int) -> float:
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def gemm_probes(rng: np.random.Generator) -> dict[str, Callable[[], Any]]:
    x = rng.standard_normal((M, K), np.float32)
    w = (rng.standard_normal((N, K), np.float32) * 0.02).astype(np.float32)
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    as_input = session([gemm], {"x": [M, K], "w": [N, K]})
    prepacked = session([gemm], {"x": [M, K]}, initializers=(numpy_helper.from_array(w, "w"),))
    swapped = session([helper.make_node("Gemm", ["w", "x"], ["y"], transB=1)], {"x": [M, K], "w": [N, K]})
    probes = {"Gemm, weight a graph input": lambda: as_input.run(None, {"x": x, "w": w}),
              "Gemm, weight an initializer (prepacked)": lambda: prepacked.run(None, {"x": x}),
              "Gemm, operands swapped": lambda: swapped.run(None, {"x": x, "w": w})}
    for parts in (2, 4, 8):
        names = [f"x{i}" for i in range(parts)]
        nodes = [helper.make_node("Split", ["x"], names, axis=0, num_outputs=parts),
                 *(helper.make_node("Gemm", [n, "w"], [f"{n}y"], transB=1) for n in names),
                 helper.make_node("Concat", [f"{n}y" for n in names], ["y"], axis=0)]
        split = session(nodes, {"x": [M, K], "w": [N, K]})
        probes[f"Gemm, rows split in {parts}"] = lambda s=split: s.run(None, {"x": x, "w": w})
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    probes["torch linear"] = lambda: torch.nn.functional.linear(tx, tw)
    try:
        probes["Gemm on OpenVINO's plugin, float32"] = _openvino(gemm, x, w)
    except ImportError:
        pass
    return probes


def _openvino(gemm: Any, x: np.ndarray, w: np.ndarray) -> Callable[[], Any]:
    import onnxruntime_ep_openvino as plugin

    ort.register_execution_provider_library(plugin.get_ep_name(), plugin.get_library_path())
    devices = [d for d in ort.get_ep_devices()
               if d.ep_name == plugin.get_ep_name() and d.device.type == ort.OrtHardwareDeviceType.CPU]
    options = ort.SessionOptions()
    # Its CPU plugin computes in bfloat16 where the CPU has it, unless told float32.
    options.add_provider_for_devices(devices, {"load_config": json.dumps(
        {"CPU": {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": "2"}})})
    s = session([gemm], {"x": [M, K], "w": [N, K]}, options=options)
    return lambda: s.run(None, {"x": x, "w": w})


def attention_probes(rng: np.random.Generator) -> dict[str, Callable[[], Any]]:
    shape = [1, HEADS, SEQ, HEAD_DIM]
    q, k, v = (rng.standard_normal(shape, np.float32) for _ in range(3))
    feed, heads = {"q": q, "k": k, "v": v}, {"q": shape, "k": shape, "v": shape}
    scale = numpy_helper.from_array(np.asarray(HEAD_DIM**-0.5, np.float32), "scale")
    unfused = session([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                       helper.make_node("MatMul", ["q", "kt"], ["s"]),
                       helper.make_node("Mul", ["s", "scale"], ["s2"]),
                       helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
                       helper.make_node("MatMul", ["p", "v"], ["y"])], heads, initializers=(scale,))
    fused = session([helper.make_node("Attention", ["q", "k", "v"], ["y"])], heads, opset=23)
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    return {"attention: MatMul, Softmax, MatMul": lambda: unfused.run(None, feed),
            "attention: ONNX Attention (opset 23)": lambda: fused.run(None, feed),
            "attention: torch scaled_dot_product_attention": lambda: torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=15, help="timed calls per probe and round (the median is kept)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    probes = {**gemm_probes(rng), **attention_probes(rng)}
    results: dict[str, list[float]] = {name: [] for name in probes}
    for _ in range(args.rounds):  # rounds interleave the probes, so a busy spell of the machine hits them all
        for name, call in probes.items():
            results[name].append(median_ms(call, args.calls))
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, 2 threads, medians of {args.calls} calls\n")
    print("| probe | ms per call, each round |\n|---|---|")
    for name, times in results.items():
        print(f"| {name} | {' / '.join(f'{t:.1f}' for t in times)} |")


if __name__ == "__main__":
    main()
