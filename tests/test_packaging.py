"""Packaging: the wheel ships the toy checkpoint and finds it once installed; the dependency floors are true.

The full check (the wheel built from a clean checkout, installed with the CPU torch wheel into a fresh virtual
environment, `pip check`, `mm-lens demo` from another directory) is scripts/check_wheel.sh, which .ci/run calls
directly; here it runs only with MM_LENS_WHEEL_TEST=1 (MM_LENS_WHEEL_TEST=floors adds the all-floors install).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "assets" / "toy-llava"
WHEEL_TOY = "mm_lens/_assets/toy-llava"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the working tree (pip wheel --no-deps; without build isolation when hatchling is installed)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.insert(4, "--no-build-isolation")
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("mm_lens-*.whl")
    return path


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def requirements(wheel: Path) -> dict[str, Requirement]:
    """The wheel's unconditional requirements (no extra, no marker), by canonical name."""
    reqs = [Requirement(line) for line in wheel_metadata(wheel).get_all("Requires-Dist")]
    return {canonicalize_name(r.name): r for r in reqs if r.marker is None}


def floor(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(lows) if lows else None


def test_wheel_ships_the_toy_checkpoint(wheel):
    files = sorted(p for p in TOY.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in files:
            assert f"{WHEEL_TOY}/{path.name}" in names, f"{path.name} is not in the wheel"
            assert z.read(f"{WHEEL_TOY}/{path.name}") == path.read_bytes(), f"{path.name} differs in the wheel"
        assert not any(n.startswith("assets/") for n in names)  # inside the package, not a top-level 'assets'
        # the package's other data, and the command
        for csv in (REPO / "mm_lens" / "data" / "gqa").glob("*.csv"):
            assert f"mm_lens/data/gqa/{csv.name}" in names
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        assert "mm-lens = mm_lens.cli:main" in entry_points


def test_toy_model_path_in_the_checkout():
    import mm_lens
    from mm_lens.demo import toy_model_path

    if not Path(mm_lens.__file__).resolve().is_relative_to(REPO):
        pytest.skip("mm_lens is not imported from this checkout")
    assert toy_model_path() == TOY


def test_installed_wheel_finds_its_toy_checkpoint(wheel, tmp_path):
    """The wheel unpacked as site-packages would hold it, imported from another directory: the toy model is the
    wheel's copy, not the checkout's."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = "import mm_lens, mm_lens.demo as d; print(mm_lens.__file__); print(d.toy_model_path())"
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    module, toy = (Path(line) for line in done.stdout.split())
    assert module == site / "mm_lens" / "__init__.py"
    assert toy == site / "mm_lens" / "_assets" / "toy-llava" and (toy / "config.json").is_file()


def test_every_dependency_has_a_floor_that_the_environment_meets(wheel):
    for name, req in requirements(wheel).items():
        assert floor(req) is not None, f"{req} has no floor"
        installed = md.version(name)
        assert req.specifier.contains(installed, prereleases=True), f"installed {name} {installed} is not {req}"


def test_floors_meet_what_the_floor_versions_of_the_dependencies_require(wheel):
    """Where a dependency is installed at its floor, its own requirements on our other dependencies are their
    floors' lower bound: transformer_lens 4.3 requires transformers>=5.9, so transformers>=4.57 would be untrue."""
    ours = requirements(wheel)
    checked = 0
    for name, req in ours.items():
        dist = md.distribution(name)
        if Version(dist.version) != floor(req):
            continue
        for line in dist.requires or []:
            theirs = Requirement(line)
            target = canonicalize_name(theirs.name)
            if target not in ours or (theirs.marker is not None and not theirs.marker.evaluate({"extra": ""})):
                continue
            checked += 1
            lows = [Version(s.version) for s in theirs.specifier if s.operator in (">=", ">", "==", "~=")]
            assert all(floor(ours[target]) >= low for low in lows), (
                f"{name} {dist.version} requires {theirs}, but mm-lens allows {ours[target]}"
            )
    if not checked:
        pytest.skip("no dependency is installed at its floor")


def test_every_third_party_import_of_the_package_is_a_dependency(wheel):
    declared = set(requirements(wheel))
    providers = md.packages_distributions()
    missing = {}
    for path in sorted((REPO / "mm_lens").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "mm_lens":
                    continue
                dists = {canonicalize_name(d) for d in providers.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, path.relative_to(REPO).as_posix())
    assert not missing, f"imported by mm_lens but not a dependency: {missing}"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MM_LENS_WHEEL_TEST") not in ("1", "floors"),
                    reason="the fresh-venv wheel check runs with MM_LENS_WHEEL_TEST=1 (CI calls the script itself)")
def test_fresh_venv_install_of_the_wheel_runs_the_demo():
    args = ["--floors"] if os.environ["MM_LENS_WHEEL_TEST"] == "floors" else []
    done = subprocess.run(["bash", str(REPO / "scripts" / "check_wheel.sh"), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
