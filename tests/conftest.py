import os

import pytest

# MindSpore reads its log level at import: keep its INFO/WARNING lines out of test output.
os.environ.setdefault("GLOG_v", "3")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """`checkpoint(preset_name)`: the tiny-family checkpoint of that name, written once per session. Tests must
    not modify it (copy it first)."""
    from mindvl.fixtures import write_checkpoint

    made = {}

    def get(preset: str = "tiny"):
        if preset not in made:
            made[preset] = write_checkpoint(tmp_path_factory.mktemp(f"checkpoint-{preset}") / "model", preset)
        return made[preset]

    return get


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
