"""A non-editable install (`pip install .`, as a user gets it) holds what the project ships:
the top-level workloads/ folder, mapped into the package by setup.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# run with -S (no site-packages, so no editable install of this checkout): only the
# installed copy and the standard library are importable
LOAD = """
import json, specbench
from importlib.resources import files
from specbench.workloads import SHIPPED, open_workload, registry
print(json.dumps({
    "package": specbench.__file__,
    "names": list(registry()),
    "prompts": {name: len(open_workload(name).prompts) for name in ("builtin", "builtin-completion", "pool-train", "pool-train-extra", "pool-heldout")},
    "source": open_workload("builtin").source,
    "readmes": sorted(f.name for f in files(SHIPPED).iterdir() if f.joinpath("README.md").is_file()),
}))
"""


@pytest.mark.slow  # builds a wheel in an isolated environment: ~30 s
def test_non_editable_install_has_the_shipped_workloads(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "results", "tests", "*.egg-info", "__pycache__", ".pytest_cache"))
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, source],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    shutil.rmtree(source)  # nothing may come from the source tree

    loaded = subprocess.run([sys.executable, "-S", "-c", LOAD], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(site)})
    assert loaded.returncode == 0, loaded.stderr
    found = json.loads(loaded.stdout)
    assert Path(found["package"]).is_relative_to(site)
    assert found["names"] == ["builtin", "builtin-completion", "pool-train", "pool-train-extra", "pool-heldout", "mt-bench", "spec-bench",
                              "hellaswag"]
    assert found["prompts"] == {"builtin": 16, "builtin-completion": 6, "pool-train": 392, "pool-train-extra": 833, "pool-heldout": 44}
    assert found["source"] == "workloads/builtin/prompts.jsonl"
    assert found["readmes"] == sorted(found["names"])


def test_every_workload_folder_has_its_spec_readme_and_data():
    from specbench.workloads import registry

    folders = sorted(p.name for p in (ROOT / "workloads").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert sorted(registry()) == folders
    for name, spec in registry().items():
        readme = (ROOT / "workloads" / name / "README.md").read_text()
        assert "Licence:" in readme, name
        if "file" in spec:  # shipped: the data is in the folder
            assert (ROOT / "workloads" / name / spec["file"]).is_file(), name
        else:  # published: where it comes from, for the message a missing file gets
            assert spec["source"] and spec["local"].startswith(f"{name}/"), name
