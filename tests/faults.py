"""Real `specbench` processes killed at fixed points, for the fault tests and the sweep (tests/sweep.py).

`spawn(argv, cwd, kill_at=KillAt("specbench.store:RunStore.append_prompt", 3, "SIGKILL"))` starts the
CLI in a fresh interpreter, as the console script does, with one function wrapped so that the
process sends itself the signal on that function's n-th call (before it runs, or after it
returns): a kill at a known point instead of a guess at a time. `go_file` holds the process,
fully imported, until the file exists, so a second process can be released at a chosen moment.
`hold_at=HoldAt("specbench.train.data:_generate", reached, release)` stops the process on that
function's call (a point inside its write lock) until `release` exists, after touching `reached`:
a second writer then meets the lock however slow the machine, never a race against the first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PREAMBLE = """
import importlib, os, signal, sys, time
kill, go, hold = {kill!r}, {go!r}, {hold!r}
# a test runner started in the background (nohup, `cmd &`) passes SIGINT down ignored: a ctrl-C
# to a foreground specbench is what the faults mean, so it raises KeyboardInterrupt here too
signal.signal(signal.SIGINT, signal.default_int_handler)


def wrap(target, around):
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, around(getattr(owner, name)))


if hold:
    def holding(original, calls=[0]):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == hold[1]:
                open(hold[2], "w").close()
                while not os.path.exists(hold[3]):
                    time.sleep(0.01)
            return original(*args, **kwargs)
        return wrapped
    wrap(hold[0], holding)
if kill:
    target, call, sig, when = kill
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and when == "before":
            os.kill(os.getpid(), getattr(signal, sig))
        result = original(*args, **kwargs)
        if calls[0] == call and when == "after":
            os.kill(os.getpid(), getattr(signal, sig))
        return result

    setattr(owner, name, wrapped)
if go:
    import specbench.cli  # everything a run imports (the CLI loads the drafters for their flags), before waiting
    while not os.path.exists(go):
        time.sleep(0.01)
from specbench.cli import main
sys.argv[0] = "specbench"
main()
"""


@dataclass
class KillAt:
    target: str  # "module:Qualified.name" of the function to wrap
    call: int = 1  # on its n-th call
    signal: str = "SIGKILL"  # or SIGINT (ctrl-C), SIGTERM (kill, a scheduler's stop)
    when: str = "before"  # before the call runs, or after it returns


@dataclass
class HoldAt:
    target: str  # "module:Qualified.name" of the function to stop before
    reached: Path  # touched when the process gets there
    release: Path  # the process goes on once this exists
    call: int = 1  # on its n-th call


def spawn(argv: list, cwd: Path, kill_at: KillAt | None = None, go_file: Path | None = None, env: dict | None = None,
          hold_at: HoldAt | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", **(env or {})}
    kill = (kill_at.target, kill_at.call, kill_at.signal, kill_at.when) if kill_at else None
    hold = (hold_at.target, hold_at.call, str(hold_at.reached), str(hold_at.release)) if hold_at else None
    code = PREAMBLE.format(kill=kill, go=str(go_file) if go_file else None, hold=hold)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
