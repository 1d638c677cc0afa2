"""`mindvl export --force` over an existing artifact: the old one is replaced whole, or, when the swap fails, kept
whole; either way nothing is left beside it. And every file of an export has the modes the umask gives."""

import errno
import os
import shutil
import stat

import pytest

from mindvl.errors import ExportError
from mindvl.export import export_artifacts
from mindvl.shapes.buckets import BucketSpec
from mindvl.shapes.manifest import MANIFEST, Manifest, file_sha256

SMALL = BucketSpec.from_dict({"batch": [1], "prefill": [64], "cache": [128]})  # two graphs: a quick export


def contents(folder):
    return {str(p.relative_to(folder)): None if p.is_dir() else file_sha256(p) for p in sorted(folder.rglob("*"))}


def test_force_replaces_an_artifact_whole_and_leaves_nothing_beside_it(exported, tmp_path):
    model, art = exported("tiny")
    out = shutil.copytree(art, tmp_path / "out")
    export_artifacts(model, out, SMALL, force=True, log=lambda line: None)
    new = Manifest.read(out)
    assert new.buckets == {**SMALL.to_dict(), "dtype": "float32"}
    # Only the new export's files: nothing of the old one (its vision graphs, say) survives.
    assert {p for p, sha in contents(out).items() if sha} == {*new.files, MANIFEST}
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_swap_keeps_the_old_artifact_and_leaves_nothing_beside_it(exported, tmp_path, monkeypatch):
    model, art = exported("tiny")
    out = shutil.copytree(art, tmp_path / "out")
    before = contents(out)
    rename = os.rename

    def new_export_cannot_move(src, dst):
        if os.path.basename(src).startswith(".out.partial-"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", new_export_cannot_move)
    with pytest.raises(ExportError, match=r"cannot move the new export into .*out .*left as it was"):
        export_artifacts(model, out, SMALL, force=True, log=lambda line: None)
    assert contents(out) == before
    assert os.listdir(tmp_path) == ["out"]


def test_only_real_folders_named_like_dead_partials_are_removed(exported, tmp_path):
    """A killed export's temporary folder goes; a look-alike name, and a link named like one (and what it points
    to), stay. Pids this large are above the kernel's pid_max, so their processes are gone."""
    model, _ = exported("tiny")
    (tmp_path / ".out.partial-999999999").mkdir()
    for folder in (".out.partial-mine-999999998", "target"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "keep.txt").write_text("mine")
    (tmp_path / ".out.partial-999999997").symlink_to(tmp_path / "target")
    export_artifacts(model, tmp_path / "out", SMALL, log=lambda line: None)
    assert sorted(os.listdir(tmp_path)) == [".out.partial-999999997", ".out.partial-mine-999999998", "out", "target"]
    assert (tmp_path / ".out.partial-mine-999999998" / "keep.txt").is_file()
    assert (tmp_path / "target" / "keep.txt").is_file()


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_every_file_has_the_mode_the_umask_gives(exported, tmp_path, umask, file_mode, folder_mode):
    """MindSpore writes graphs 0400: an export by one account would not load under another (a service)."""
    model, _ = exported("tiny")
    previous = os.umask(umask)
    try:
        export_artifacts(model, tmp_path / "out", SMALL, log=lambda line: None)
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.lstat().st_mode) for p in tmp_path.rglob("*")}
    assert any(name.endswith(".mindir") for name in modes)
    assert modes == {name: folder_mode if (tmp_path / name).is_dir() else file_mode for name in modes}
