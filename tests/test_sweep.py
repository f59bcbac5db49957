"""The adversarial sweep (tests/sweep.py), one test per case, marked `sweep`:

    python -m pytest -m sweep            # every case and fault (a few minutes on 2 CPU cores)
    (the four SmolLM2-135M cases are marked heavy too: -m "sweep and not heavy" leaves them out)

The default suite leaves the sweep out (pyproject.toml's addopts); the mechanisms its cases
drive are tested directly in the default suite (test_robust.py, test_integrity.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import sweep
import torch

pytestmark = pytest.mark.sweep


def case_names(smollm2: bool = False) -> list[str]:
    """The cases' names, from the case functions run against placeholder paths (nothing runs)."""
    s = sweep.Sweep(Path(tempfile.gettempdir()) / "sweep-collect-nothing-is-written")
    m, w, extra = sweep.Names(), sweep.Names(), sweep.Names()
    if smollm2:
        sweep.smollm2_cases(s, w)
    else:
        sweep.input_cases(s, m, w, extra)
        sweep.good_cases(s, m, w, extra)
        sweep.issue28_cases(s, m, w, extra)
    return list(s.cases)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The tiny models, workloads, run directories and logs every case reads, made once."""
    root = tmp_path_factory.mktemp("sweep")
    saved_env, saved_threads = os.environ.get("SPECBENCH_DATA"), torch.get_num_threads()
    os.environ["SPECBENCH_DATA"] = str(root / "no-data")  # workloads that need a download are offline
    torch.set_num_threads(1)
    try:
        s = sweep.Sweep(root)
        m = sweep.make_models(root / "models")
        w = sweep.make_workloads(root)
        extra = sweep.prepare(s, m, w)
        sweep.input_cases(s, m, w, extra)
        sweep.good_cases(s, m, w, extra)
        sweep.issue28_cases(s, m, w, extra)
        sweep.smollm2_cases(s, w)
        yield SimpleNamespace(sweep=s, root=root, m=m, w=w, extra=extra)
    finally:
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("SPECBENCH_DATA", None)
        else:
            os.environ["SPECBENCH_DATA"] = saved_env


@pytest.mark.parametrize("name", case_names())
def test_case(world, name):
    problems = world.sweep.cases[name]()
    assert not problems, "\n".join(problems)


@pytest.mark.heavy
@pytest.mark.parametrize("name", case_names(smollm2=True))
def test_smollm2_case(world, name):
    problems = world.sweep.cases[name]()
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def fault_results(world):
    return sweep.faults(world.root / "faults", world.m, world.w)


@pytest.fixture(scope="session")
def fault28_results(world):
    return sweep.faults28(world.root / "faults28", world.m, world.w, world.extra)


@pytest.mark.parametrize("name", sweep.FAULTS)
def test_fault(fault_results, name):
    assert name in fault_results, f"no fault named {name!r} ran (ran: {sorted(fault_results)})"
    assert not fault_results[name], "\n".join(fault_results[name])


@pytest.mark.parametrize("name", sweep.FAULTS28)
def test_fault_issue28(fault28_results, name):
    assert name in fault28_results, f"no fault named {name!r} ran (ran: {sorted(fault28_results)})"
    assert not fault28_results[name], "\n".join(fault28_results[name])
