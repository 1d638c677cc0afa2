import os

import pytest

# MindSpore reads its log level at import: keep its INFO/WARNING lines out of test output.
os.environ.setdefault("GLOG_v", "3")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """`checkpoint(preset_name)`: the tiny-family checkpoint of that name, written once per session. Tests must
    not modify it (copy it first)."""
    from mindvl.testing.checkpoints import write_checkpoint

    made = {}

    def get(preset: str = "tiny"):
        if preset not in made:
            made[preset] = write_checkpoint(tmp_path_factory.mktemp(f"checkpoint-{preset}") / "model", preset)
        return made[preset]

    return get


@pytest.fixture(scope="session")
def model_dir(checkpoint):
    """The `tiny` checkpoint's folder (a test module may override it)."""
    return checkpoint("tiny")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    """The tiny checkpoint's tokenizer."""
    from mindvl.shapes.prompt import Tokenizer

    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoint):
    """`exported(preset_name)`: the checkpoint of that name and its export at the `tiny` bucket preset, made once
    per session. Tests must not modify either (copy it first)."""
    from mindvl.export import export_artifacts
    from mindvl.shapes.buckets import BucketSpec

    made = {}

    def get(preset: str = "tiny"):
        if preset not in made:
            artifacts = tmp_path_factory.mktemp(f"exported-{preset}") / "artifacts"
            export_artifacts(checkpoint(preset), artifacts, BucketSpec.preset("tiny"), log=lambda line: None)
            made[preset] = (checkpoint(preset), artifacts)
        return made[preset]

    return get


# Batch buckets up to 4, two caches, a video bucket: the export the batching, fault and mixed-traffic tests share.
BATCH4_SPEC = {"images": ["112x112", "224x224"], "videos": [{"frames": 4, "size": "112x112"}], "batch": [1, 4],
               "prefill": [64, 128, 256], "cache": [256, 512]}
# Prefill buckets far shorter than the caches: ordinary prompts are prefilled in 2-5 chunks (the reuse tests).
SMALL_PREFILL_SPEC = {"images": ["112x112", "224x224"], "videos": [{"frames": 4, "size": "112x112"}], "batch": [1],
                      "prefill": [32, 64], "cache": [256, 512]}


def export_tiny(checkpoint, tmp_path_factory, name: str, spec: dict):
    """The tiny checkpoint exported at bucket spec `spec` (a dict as in YAML) into a new temporary folder `name`."""
    from mindvl.export import export_artifacts
    from mindvl.shapes.buckets import BucketSpec

    out = tmp_path_factory.mktemp(name) / "artifacts"
    export_artifacts(checkpoint("tiny"), out, BucketSpec.from_dict(spec), log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def batch4(checkpoint, tmp_path_factory):
    """The tiny checkpoint exported at BATCH4_SPEC, once per session. Tests must not modify it."""
    return export_tiny(checkpoint, tmp_path_factory, "batch4", BATCH4_SPEC)


@pytest.fixture(scope="session")
def small_prefill(checkpoint, tmp_path_factory):
    """The tiny checkpoint exported at SMALL_PREFILL_SPEC, once per session. Tests must not modify it."""
    return export_tiny(checkpoint, tmp_path_factory, "small-prefill", SMALL_PREFILL_SPEC)
