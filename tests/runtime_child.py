"""Runs requests through the runtime in a process that records every attempt to import mindvl.qwen2vl, proving
the runtime needs no model code. Usage: python runtime_child.py ARTIFACTS REQUESTS.json → one JSON object on stdout.

Attempts are recorded, not refused: a refused import would crash this process (or be caught by the code that
tried it) before the test could say what was imported.
"""

import importlib.abc
import json
import sys


class RecordModelCode(importlib.abc.MetaPathFinder):
    attempts: list[str] = []

    def find_spec(self, name, path, target=None):
        if name == "mindvl.qwen2vl" or name.startswith("mindvl.qwen2vl."):
            self.attempts.append(name)
        return None  # the import goes on, so the requests still run


sys.meta_path.insert(0, RecordModelCode())

import numpy as np  # noqa: E402

from mindvl.runtime import Runtime  # noqa: E402

runtime = Runtime.load(sys.argv[1])
results = {}
for name, request in json.loads(open(sys.argv[2]).read()).items():
    out = runtime.generate(request["text"], images=request["images"], videos=[np.load(v) for v in request["videos"]],
                           max_new_tokens=request["max_new_tokens"])
    results[name] = {"token_ids": out.token_ids, "buckets": out.buckets}
results["model_code_imported"] = RecordModelCode.attempts
print(json.dumps(results))
