"""ONNX graphs run by onnxruntime, behind the same `Artifacts.run` as the MindIR graphs.

The weights are bound once as OrtValues over the arrays read from weights.safetensors (no copy on CPU), and every
call binds them by name through IOBinding. A text graph's caches are bound as inputs and each `present` output to
its own input's buffer, so onnxruntime's ScatterND writes the cache in place: a call never copies a cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mindvl.errors import ArtifactError
from mindvl.runtime.artifacts import CacheSets
from mindvl.shapes.graphs import GraphSpec, TensorSpec, present_name
from mindvl.shapes.image import one_line
from mindvl.shapes.manifest import MANIFEST, Manifest

PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider"}
_ORT_TYPES = {"float32": "tensor(float)", "int32": "tensor(int32)"}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ArtifactError("this artifact's graphs are ONNX, which needs onnxruntime: pip install \"mindvl[onnx]\", "
                            "or run its MindIR graphs (export with --format mindir)") from None
    return onnxruntime


class OnnxGraphs:
    def __init__(self, folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray], provider: str = "CPU") -> None:
        self.ort = _onnxruntime()
        if provider not in PROVIDERS:
            raise ArtifactError(f"execution provider {provider!r}: use one of {', '.join(PROVIDERS)}")
        available = self.ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise ArtifactError(f"onnxruntime here has no {PROVIDERS[provider]} (it has {', '.join(available)}); "
                                f"install onnxruntime-gpu for CUDA, or use --provider CPU")
        self.folder, self.manifest, self.provider = folder, manifest, provider
        self.device = "cuda" if provider == "CUDA" else "cpu"
        w = manifest.weights
        self._held: list[np.ndarray] = []
        values = {name: self._value(np.ascontiguousarray(a)) for name, a in arrays.items()}
        self.weights = {group: [(e["name"], values[w["aliases"].get(e["name"], e["name"])]) for e in entries]
                        for group, entries in w["groups"].items()}
        self._sessions: dict[str, Any] = {}
        # Zeros, as MindIR caches are: a slot no mask admits still meets a zero probability, and 0 × NaN is NaN.
        self._caches = CacheSets(lambda c: self._value(np.zeros(c.shape, np.float32)))

    def _value(self, array: np.ndarray) -> Any:
        """An OrtValue over `array`. It does not own the array's memory: the array is held as long as the graphs
        run."""
        self._held.append(array)
        return self.ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def graph(self, spec: GraphSpec) -> Any:
        """The graph's session, its file's hash checked and its inputs and outputs those the manifest declares."""
        if spec.name not in self._sessions:
            self._sessions[spec.name] = load_session(self.ort, self.folder, self.manifest, spec,
                                                     [PROVIDERS[self.provider]])
        return self._sessions[spec.name]

    def caches(self, spec: GraphSpec, cache_set: int) -> tuple[Any, ...]:
        return self._caches.get(spec, cache_set)

    def run(self, spec: GraphSpec, fed: list[np.ndarray], cache_set: int) -> np.ndarray:
        binding = self.bind(spec, fed, cache_set)
        self.graph(spec).run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def bind(self, spec: GraphSpec, fed: list[np.ndarray], cache_set: int) -> Any:
        """One call's IOBinding: the data inputs, each cache as input and its present output on the same buffer,
        the weights by name, and the output."""
        binding = self.graph(spec).io_binding()
        binding.bind_output(spec.outputs[0].name, "cpu")  # first: outputs come back in the order they are bound
        for declared, array in zip(spec.inputs, fed, strict=True):
            binding.bind_cpu_input(declared.name, np.ascontiguousarray(array, np.dtype(declared.dtype)))
        for declared, value in zip(spec.caches, self.caches(spec, cache_set), strict=True):
            binding.bind_ortvalue_input(declared.name, value)
            binding.bind_ortvalue_output(present_name(declared.name), value)  # written in place
        for name, value in self.weights[spec.weights]:
            binding.bind_ortvalue_input(name, value)
        return binding


def load_session(ort: Any, folder: Path, manifest: Manifest, spec: GraphSpec, providers: list[str]) -> Any:
    """An onnxruntime session of one graph, its file's hash checked, taking exactly what the manifest says it takes:
    its inputs, caches and weights by name, shape and type, and returning its output and each cache's present."""
    path = manifest.check_file(folder, spec.file)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for a file it cannot parse
        raise ArtifactError(f"{spec.file} cannot be loaded by onnxruntime {ort.__version__} ({one_line(e)[:160]}); "
                            f"re-export the artifacts") from None
    weights = [TensorSpec(e["name"], tuple(e["shape"]), "float32") for e in manifest.weights["groups"][spec.weights]]
    presents = [TensorSpec(present_name(c.name), c.shape, c.dtype) for c in spec.caches]
    for what, declared, found in (("inputs", [*spec.inputs, *spec.caches, *weights], session.get_inputs()),
                                  ("outputs", [*spec.outputs, *presents], session.get_outputs())):
        want = [(t.name, list(t.shape), _ORT_TYPES[t.dtype]) for t in declared]
        have = [(a.name, list(a.shape), a.type) for a in found]
        if want != have:
            wrong = next((w, h) for w, h in zip([*want, None], [*have, None], strict=False) if w != h)
            raise ArtifactError(f"{spec.file}'s {what} disagree with {MANIFEST}: it has {wrong[1]} where the "
                                f"manifest declares {wrong[0]}; re-export the artifacts")
    return session


def verify_onnx(folder: Path, manifest: Manifest, spec: GraphSpec) -> None:
    """`inspect --verify` for an ONNX graph: onnx's full check, then a session as the runtime would load it."""
    ort = _onnxruntime()
    import onnx

    path = manifest.check_file(folder, spec.file)
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as e:  # protobuf's DecodeError, onnx's ValidationError and InferenceError, OSError
        raise ArtifactError(f"{spec.file} fails onnx's full check ({one_line(e)[:160]}); re-export the "
                            f"artifacts") from None
    load_session(ort, folder, manifest, spec, ["CPUExecutionProvider"])
