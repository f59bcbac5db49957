"""A third-party drafter installed as its own package reaches `--drafter` through the entry point."""

import json
import os
import subprocess
import sys
import textwrap

from tiny import save_tiny_model

PLUGIN = '''
from specbench.engine.options import ChainOptions
from specbench.engine.protocol import Drafter
from specbench.engine.tree import DraftTree


class RepeatLastDrafter(Drafter):
    """Drafts the root token k times: a silly drafter that is sometimes right."""

    name = "repeat-last"
    summary = "test plugin: repeats the last token k times"
    Options = ChainOptions

    def propose(self, ctx):
        k = min(self.options.k, ctx.max_tokens)
        return DraftTree.chain(ctx.tokens[-1:].repeat(k))
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "specbench-repeat-plugin"
version = "0.0.1"

[project.entry-points."specbench.drafters"]
repeat-last = "repeat_plugin:RepeatLastDrafter"

[tool.setuptools]
py-modules = ["repeat_plugin"]
'''


def specbench(args, env):
    return subprocess.run(
        [sys.executable, "-m", "specbench.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def test_installed_plugin_runs_through_the_cli(tmp_path):
    package = tmp_path / "plugin"
    package.mkdir()
    (package / "repeat_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (package / "pyproject.toml").write_text(PYPROJECT)
    site = tmp_path / "site"
    # installed into its own directory, so the test leaves the environment as it found it
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site, package],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    listed = specbench(["drafters"], env)
    assert listed.returncode == 0, listed.stderr
    assert "repeat-last" in listed.stdout and "test plugin" in listed.stdout

    target = save_tiny_model(tmp_path / "target", seed=0)
    out = tmp_path / "results"
    result = specbench(
        ["run", "--target", target, "--drafter", "repeat-last", "-o", "k=3", "--workload", "builtin-completion",
         "--limit", 2, "--max-new-tokens", 16, "--out", out, "--json"],
        env,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["exact_match_rate"] == 1.0
    (run_dir,) = out.iterdir()
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert {s["tree_size"] for s in steps if s["mode"] == "spec"} <= {1, 2, 3}
    assert any(s["tree_size"] == 3 for s in steps if s["mode"] == "spec")
