import os

import pytest

# MindSpore reads its log level at import: keep its INFO/WARNING lines out of test output.
os.environ.setdefault("GLOG_v", "3")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """`exported(preset_name)`: the tiny-family checkpoint of that name exported at the `tiny` bucket preset,
    made once per session. Tests must not modify it (copy it first)."""
    from mindvl.export import export_artifacts
    from mindvl.fixtures import write_checkpoint
    from mindvl.shapes.buckets import BucketSpec

    made = {}

    def get(preset: str = "tiny"):
        if preset not in made:
            root = tmp_path_factory.mktemp(f"exported-{preset}")
            model = write_checkpoint(root / "model", preset)
            export_artifacts(model, root / "artifacts", BucketSpec.preset("tiny"), log=lambda line: None)
            made[preset] = (model, root / "artifacts")
        return made[preset]

    return get
