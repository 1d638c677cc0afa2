"""One text-bucket policy, and the manifest as the runtime's truth.

`shapes.buckets.choose_text_buckets` alone decides which (batch, prefill, cache) buckets a request takes: the
runtime, the batcher and the server take its answer. And the runtime feeds every graph as the artifact's manifest
declares it, never as the code that declares graphs would build it today.
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from media import sample_image

from mindvl.runtime import Runtime
from mindvl.runtime.batch import Batch
from mindvl.serve.completions import _Budget
from mindvl.serve.errors import ServeError
from mindvl.serve.metrics import Metrics
from mindvl.serve.scheduler import Scheduler
from mindvl.shapes.buckets import BucketError, choose_text_buckets


@pytest.fixture(scope="module")
def runtime(batch4):
    return Runtime.load(batch4)


def policy(prompt, max_new, spec, **kwargs):
    try:
        return choose_text_buckets(prompt, max_new, spec, **kwargs)
    except BucketError:
        return None


def test_the_server_admits_what_the_policy_admits(runtime):
    spec = runtime.buckets
    for prompt in range(1, spec.cache[-1] + 2, 7):
        for max_tokens in (None, 1, 100, 300):
            budget = _Budget(max_tokens, spec)
            try:
                budget(prompt)
                admitted = budget.text
            except ServeError:
                admitted = None
            max_new = max_tokens or max(1, spec.cache[-1] - prompt)
            assert admitted == policy(prompt, max_new, spec, batch=spec.batch[-1]), (prompt, max_tokens)


def test_the_batcher_prefills_at_the_length_the_policy_chooses(runtime):
    spec = runtime.buckets
    for cache in spec.cache:
        batch = Batch(runtime.artifacts, 4, cache)
        for remaining in range(1, cache, 5):
            assert batch.prefill_length(remaining) == policy(remaining, 0, spec, batch=4, cache=cache).calls[0]


def test_a_batch_opens_at_the_largest_cache_its_first_requests_take(runtime):
    scheduler = Scheduler(runtime, Metrics())
    spec = runtime.buckets
    for needs in ([(10, 20)], [(10, 20), (100, 300)], [(200, 50), (10, 10), (5, 5), (1, 1)]):
        jobs = [SimpleNamespace(text=choose_text_buckets(p, n, spec, batch=4), keys=np.arange(p)) for p, n in needs]
        scheduler._waiting.extend(jobs)
        assert scheduler._open().capacity == max(job.text.cache for job in jobs)
        scheduler._waiting.clear()


# In a fresh process the code that declares graphs raises before the runtime is imported, so the runtime can
# neither call it nor hold a reference to the working version.
CHILD = """
import json, sys
from mindvl.shapes import graphs

def refuse(*args, **kwargs):
    raise AssertionError("the runtime declared a graph from code instead of reading the manifest")

for name in ("text_graph", "vision_graph", "kv_cache_specs", "all_graphs"):
    setattr(graphs, name, refuse)
from mindvl.runtime import Runtime
from mindvl.testing.media import sample_image
out = Runtime.load(sys.argv[1]).generate("Describe it.", images=[sample_image(224, 224, seed=1)], max_new_tokens=4)
print(json.dumps({"token_ids": out.token_ids, "buckets": out.buckets}))
"""


def test_the_runtime_runs_what_the_manifest_declares_without_declaring_graphs_itself(runtime, batch4):
    out = runtime.generate("Describe it.", images=[sample_image(224, 224, seed=1)], max_new_tokens=4)
    child = subprocess.run([sys.executable, "-c", CHILD, str(batch4)], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout) == {"token_ids": out.token_ids, "buckets": out.buckets}
