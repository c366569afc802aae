"""What `pip install .` (a wheel, as on a cluster image) holds, and the versions it may pull."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version

from conftest import REPO


def test_the_wheel_holds_every_module_of_the_package(tmp_path):
    src = tmp_path / "src"  # a copy: building in the clone would leave build/ there
    shutil.copytree(REPO / "train", src / "train", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    held = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    ours = {str(p.relative_to(REPO)) for p in (REPO / "train").rglob("*.py")}
    assert ours <= held, f"missing from the wheel: {sorted(ours - held)}"
    assert "train/speed/cpu_layers.py" in held


def test_what_is_installed_is_within_the_bounds_the_project_declares():
    """The suite runs on what a fresh install of pyproject.toml gets: each bounded package's
    installed version lies inside its bounds (a bound CI does not meet is untested)."""
    import pytest
    from packaging.requirements import Requirement  # accelerate's dependency

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in requirements:
        assert any(spec.operator == "<" for spec in req.specifier), f"{req.name} has no upper bound"
        assert req.specifier.contains(version(req.name), prereleases=True), (req.name, version(req.name))


def test_every_package_the_code_imports_is_declared_with_bounds():
    """A package train/ imports only through another's dependencies (Pillow through torchvision)
    would reach a fresh install at any version, untested: each must be named in pyproject.toml."""
    import ast
    from importlib.metadata import packages_distributions

    import pytest
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = {Requirement(r).name.lower() for r in tomllib.loads((REPO / "pyproject.toml").read_text())
                ["project"]["dependencies"]}
    imported = set()
    for path in (REPO / "train").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"train"}
    owners = packages_distributions()
    undeclared = {m: owners.get(m) for m in third_party if not {d.lower() for d in owners.get(m, [])} & declared}
    assert not undeclared, f"imported by train/ but not in pyproject.toml's dependencies: {undeclared}"


def test_what_the_quick_start_writes_is_left_out_of_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        import pytest

        pytest.skip("not a git checkout")
    paths = ["outputs/default/run.lock", "data/MNIST/raw/train-images-idx3-ubyte", "denoised/digit.png"]
    r = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.split() == paths, r.stdout + r.stderr
