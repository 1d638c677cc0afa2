"""The import rules of ARCHITECTURE.md, checked on the source: every `import` and `from … import` of every package
module, wherever it stands in the file (at the top or inside a function).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Package -> its folder in the repo (pyproject.toml's package-dir).
FOLDERS = {"mindvl": ROOT / "mindvl", "mindvl.apps": ROOT / "mindvl" / "apps",
           "mindvl.testing": ROOT / "mindvl" / "testing", "mindvl.bench": ROOT / "bench",
           "mindvl.export": ROOT / "export", "mindvl.plan": ROOT / "plan", "mindvl.qwen2vl": ROOT / "qwen2vl",
           "mindvl.runtime": ROOT / "runtime",
           "mindvl.serve": ROOT / "serve", "mindvl.shapes": ROOT / "shapes"}
# And `mindvl` itself, for its __version__.
BASE = ("mindvl.errors", "mindvl.device", "mindvl.plotting", "mindvl.tensorfile")
# Package -> the mindvl packages it must not import, and the outside ones.
_APPS = ("mindvl.apps", "mindvl.bench", "mindvl.testing")  # above every library layer
FORBIDDEN = {
    "mindvl": (("mindvl.",), ("torch", "transformers")),
    "mindvl.shapes": (("mindvl.plan", "mindvl.qwen2vl", "mindvl.export", "mindvl.runtime", "mindvl.serve", *_APPS),
                      ("mindspore", "torch", "transformers")),
    "mindvl.qwen2vl": (("mindvl.plan", "mindvl.export", "mindvl.runtime", "mindvl.serve", *_APPS),
                       ("torch", "transformers")),
    "mindvl.export": (("mindvl.plan", "mindvl.runtime", "mindvl.serve", *_APPS), ("torch", "transformers")),
    "mindvl.runtime": (("mindvl.plan", "mindvl.qwen2vl", "mindvl.export", "mindvl.serve", *_APPS),
                       ("torch", "transformers", "fastapi", "uvicorn", "starlette")),
    "mindvl.serve": (("mindvl.plan", "mindvl.qwen2vl", "mindvl.export", *_APPS), ("torch", "transformers")),
    # The planner reasons on shapes alone: it runs where MindSpore is not installed, and loads no model.
    "mindvl.plan": (("mindvl.qwen2vl", "mindvl.export", "mindvl.runtime", "mindvl.serve", *_APPS),
                    ("mindspore", "torch", "transformers")),
    "mindvl.testing": (("mindvl.plan", "mindvl.qwen2vl", "mindvl.export", "mindvl.runtime", "mindvl.serve",
                        "mindvl.apps", "mindvl.bench"), ("mindspore", "torch", "transformers")),
}


def own_files(package: str) -> list[Path]:
    """The package's modules, not those of packages nested in its folder (mindvl/apps inside mindvl/)."""
    nested = [folder for name, folder in FOLDERS.items() if name.startswith(package + ".")]
    return [p for p in sorted(FOLDERS[package].rglob("*.py")) if not any(p.is_relative_to(n) for n in nested)]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def breaks(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_it_may(package):
    ours, outside = FORBIDDEN[package]
    for path in own_files(package):
        if path.name == "__main__.py":  # `python -m mindvl`: the command line's entry, an application
            continue
        found = {name for name in imports(path) if breaks(name, outside)
                 or (breaks(name, ours) and not breaks(name, BASE) and name != "mindvl.__version__")}
        assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}"


def test_only_tests_bench_and_the_demo_import_the_test_support():
    users = {path.relative_to(ROOT).as_posix() for package, folder in FOLDERS.items() if package != "mindvl.testing"
             for path in own_files(package) if any(breaks(n, ("mindvl.testing",)) for n in imports(path))}
    assert users <= {"mindvl/apps/demo.py"} | {u for u in users if u.startswith("bench/")}, users


def test_every_package_folder_is_installed():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in FOLDERS:
        assert f'"{package}"' in pyproject, f"{package} is missing from pyproject.toml's packages"
