"""Runs requests through the runtime in a process where importing mindvl.qwen2vl fails, proving the runtime
needs no model code. Usage: python runtime_child.py ARTIFACTS REQUESTS.json → one JSON object on stdout."""

import importlib.abc
import json
import sys


class BlockModelCode(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mindvl.qwen2vl" or name.startswith("mindvl.qwen2vl."):
            raise ImportError(f"{name} must not be imported by the runtime")
        return None


sys.meta_path.insert(0, BlockModelCode())

import numpy as np  # noqa: E402

from mindvl.runtime import Runtime  # noqa: E402

runtime = Runtime.load(sys.argv[1])
results = {}
for name, request in json.loads(open(sys.argv[2]).read()).items():
    out = runtime.generate(request["text"], images=request["images"], videos=[np.load(v) for v in request["videos"]],
                           max_new_tokens=request["max_new_tokens"])
    results[name] = {"token_ids": out.token_ids, "buckets": out.buckets}
results["model_code_imported"] = sorted(m for m in sys.modules if m.startswith("mindvl.qwen2vl"))
print(json.dumps(results))
