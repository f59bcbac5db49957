"""The deepspeed target backend: tensor parallelism (AutoTP) on CPU processes, and bad input.

The runs go through the real `deepspeed` launcher (gloo, DS_ACCELERATOR=cpu);
the tensor-parallel (TP) target is compared with the same model in one process.
"""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from test_cli import run_cli
from tiny import char_tokenizer, save_tiny_model, tiny_llama
from transformers import LlamaConfig

from specbench.runner import RunConfig, check
from specbench.store import RunStore
from specbench.targets import deepspeed

needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None, reason=f"deepspeed not installed: {deepspeed.INSTALL}")
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = save_tiny_model(root / "target", seed=0)
    draft = tiny_llama(0, vocab=len(char_tokenizer()))
    with torch.no_grad():  # a close copy of the target: drafts are often, not always, right
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    draft.save_pretrained(root / "draft")
    char_tokenizer().save_pretrained(root / "draft")
    return {"target": target, "draft": root / "draft", "root": root}


def config_only(directory: Path, heads: int, kv_heads: int) -> Path:
    """A model directory with a config.json and no weights: checks must refuse it before loading any."""
    LlamaConfig(hidden_size=heads * 4, num_attention_heads=heads, num_key_value_heads=kv_heads).save_pretrained(directory)
    return directory


def output_ids(run_dir: Path) -> dict[tuple[str, int, str], list[int]]:
    _, turns = RunStore.open(run_dir).load()
    return {(t.prompt_id, t.turn, t.mode): t.output_ids for t in turns}


def spec_run(models, tmp_path, backend: str, tp: int) -> list[str]:
    return ["run", "--target", models["target"], "--drafter", "draft-model", "--draft-model", models["draft"], "--k", 3,
            "--limit", 2, "--max-new-tokens", 16, "--dtype", "float32", "--device", "cpu", "--no-warmup",
            "--out", tmp_path / backend, "--backend", backend, "--tp", tp]


def hf_outputs(models, tmp_path, capsys, monkeypatch) -> dict:
    code, _, err = run_cli(spec_run(models, tmp_path, "hf", 1), capsys, monkeypatch)
    assert code == 0, err
    (run_dir,) = (tmp_path / "hf").iterdir()
    return output_ids(run_dir)


def cli_process(args, timeout=300):
    """`python -m specbench ARGS` in a fresh process (with --backend deepspeed --tp 2+ it re-launches itself under `deepspeed`)."""
    command = [sys.executable, "-m", "specbench", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=TESTS.parent)


@needs_deepspeed
def test_tp1_gives_the_hf_backend_tokens(models, tmp_path, capsys, monkeypatch):
    """--tp 1: one process forms its own one-rank group (no launcher); same device and dtype as hf, same tokens."""
    expected = hf_outputs(models, tmp_path, capsys, monkeypatch)
    done = cli_process(spec_run(models, tmp_path, "deepspeed", 1) + ["--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # stdout holds only the summary: launcher and AutoTP chatter go elsewhere
    run_dir = Path(summary["run"])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["decode"]["backend"] == "deepspeed" and info["decode"]["tp"] == 1
    assert output_ids(run_dir) == expected
    assert summary["exact_match_rate"] == 1.0


@needs_deepspeed
@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_tp2_on_cpu_matches_one_process(models, tmp_path, engine):
    """Logits within fp32 rounding of the unsharded model, on either engine (the fast engine's static
    cache around the sharded model); greedy tokens compared and reported as measured."""
    out = tmp_path / "tp2.json"
    command, env = deepspeed.launch_command(2, torch.device("cpu"), [])
    script = [str(TESTS / "deepspeed_worker.py"), str(models["target"]), str(models["draft"]), "2", str(out), engine]
    command = command[: command.index("--module")] + script  # the worker script instead of `-m specbench`
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(out.read_text())
    print(f"TP=2 on CPU (fp32): {result}")
    assert result["engine"] == engine
    assert result["max_logit_diff"] < 1e-4
    # on these tiny fp32 models no near-tie is close enough for the all-reduce order to move an argmax
    assert result["plain_exact"] == result["spec_exact"] == result["prompts"]


@pytest.mark.slow
@pytest.mark.heavy
@needs_deepspeed
def test_tp2_cli_run_drafter_and_followers(models, tmp_path, capsys, monkeypatch):
    """`specbench run --backend deepspeed --tp 2`: rank 0 drafts and records, rank 1 follows; tokens vs the hf backend."""
    expected = hf_outputs(models, tmp_path, capsys, monkeypatch)
    done = cli_process(spec_run(models, tmp_path, "deepspeed", 2) + ["--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    got = output_ids(Path(summary["run"]))
    assert got.keys() == expected.keys()  # one record set, written by rank 0 only
    same = sum(got[key] == expected[key] for key in expected)
    print(f"TP=2 CLI run: {same}/{len(expected)} outputs equal to the hf backend's; exact match vs its own plain: {summary['exact_match_rate']}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "vllm"], "unknown backend 'vllm': use hf or deepspeed"),
        (["--tp", "2"], "--tp needs --backend deepspeed"),
    ],
)
def test_bad_backend_input_is_one_line(args, message, models, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["run", "--target", models["target"], *args, "--out", tmp_path], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_deepspeed_missing_names_the_install_line(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec then reports it absent
    code, _, err = run_cli(["run", "--target", models["target"], "--backend", "deepspeed", "--out", tmp_path], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19'" in err


@needs_deepspeed
@pytest.mark.parametrize(
    "heads, kv_heads, tp, extra, message",
    [
        (1024, 1024, 1024, [], "--tp 1024 needs 1024 devices but this machine has"),
        (6, 3, 2, [], "--tp 2 does not divide the target's 3 key/value heads; use one of 1, 3"),
        (3, 3, 2, [], "--tp 2 does not divide the target's 3 attention heads"),
        (4, 4, 0, [], "--tp must be at least 1"),
        (4, 4, 2, ["--dtype", "float64"], "DeepSpeed inference runs float32, float16, bfloat16, not float64"),
    ],
)
def test_bad_tp_is_refused_before_weights_load(heads, kv_heads, tp, extra, message, models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(deepspeed, "device_count", lambda device: 8 if tp < 1024 else os.cpu_count())
    monkeypatch.setattr(deepspeed, "relaunch", lambda *a: pytest.fail("launched despite bad input"))
    model = config_only(tmp_path / "model", heads, kv_heads)
    args = ["run", "--target", model, "--backend", "deepspeed", "--tp", tp, *extra, "--out", tmp_path]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


@needs_deepspeed
def test_check_alone_loads_no_weights(tmp_path):
    """runner.check reads only the config: a directory without weights passes it."""
    model = config_only(tmp_path / "model", 4, 2)
    check(RunConfig(target=str(model), backend="deepspeed", tp=1, device="cpu"))
