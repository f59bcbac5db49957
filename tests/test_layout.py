"""The layout the design asks for: nothing low imports anything high."""

import shutil
from pathlib import Path

from script_modules import load_script

ROOT = Path(__file__).resolve().parent.parent


def check_imports_module():
    return load_script("check_imports")


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


def import_cycles(package=None) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (function-local imports count)."""
    checker = check_imports_module()
    package = package or checker.PACKAGE
    graph = {}
    for path in package.rglob("*.py"):
        module = checker.module_name(path, package)
        graph[module] = {name for _, name in checker.imports(path, module, package)}
    order, low, stack, cycles = {}, {}, [], []

    def visit(module):  # Tarjan's strongly connected components
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in graph[module] & graph.keys():
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return cycles


def test_no_import_cycle(tmp_path):
    assert import_cycles() == []
    copy = tmp_path / "specbench"  # and a cycle is found: html importing build back, as it once did
    shutil.copytree(ROOT / "specbench", copy, ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    html = copy / "report" / "html.py"
    html.write_text(html.read_text() + "\n\ndef back():\n    from specbench.report.build import build\n")
    assert import_cycles(copy) == [["specbench.report.build", "specbench.report.html"]]
