"""The layout the design asks for: nothing low imports anything high."""

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check_imports_module():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_upward_import_in_the_package():
    upward, unplaced = check_imports_module().check()
    assert upward == [] and unplaced == []


def test_the_checker_catches_an_upward_import(tmp_path):
    """A function-local import from the decode loop up into the drafters is found and named."""
    checker = check_imports_module()
    copy = tmp_path / "specbench"
    shutil.copytree(ROOT / "specbench", copy, ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    loop = copy / "engine" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef sneaky():\n    from specbench.drafters.registry import build_drafter\n")
    (copy / "engine" / "relative.py").write_text("from ..runner import RunConfig\n")
    upward, _ = checker.check(copy)
    assert len(upward) == 2
    assert any("specbench.engine.loop (contracts and the decode loop) imports specbench.drafters.registry (drafters)" in u for u in upward)
    assert any("specbench.engine.relative" in u and "specbench.runner" in u for u in upward)
