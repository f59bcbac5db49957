"""Hub ids (and the aliases that name them) load from the local Hugging Face cache with HF_HUB_OFFLINE=1:
a checkpoint written in the published layout (models--owner--name/refs/main → snapshots/<commit>/) is found
exactly as `hf download lmsys/vicuna-7b-v1.3` would leave it, so `--target vicuna-7b` works for users who have it."""

import json
import os
import subprocess
import sys

from tiny import save_tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(tmp_path, repo_id):
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    save_tiny_model(repo / "snapshots" / COMMIT, seed=0)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def test_alias_and_hub_id_load_from_the_offline_cache(tmp_path):
    cache = hub_cache_with(tmp_path, "lmsys/vicuna-7b-v1.3")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    code = "import sys; from specbench.cli import main; sys.argv[0] = 'specbench'; main()"
    for target in ("vicuna-7b", "lmsys/vicuna-7b-v1.3"):
        out = tmp_path / target.replace("/", "_")
        proc = subprocess.run([sys.executable, "-c", code, "run", "--target", target, "--limit", "1", "--max-new-tokens", "6",
                               "--no-warmup", "--out", str(out), "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (run_dir,) = out.iterdir()
        info = json.loads((run_dir / "run.json").read_text())
        assert info["target"] == target and info["target_id"] == "lmsys/vicuna-7b-v1.3"
