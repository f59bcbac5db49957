"""End-to-end runs on the embedded default, SmolLM2-135M-Instruct (CPU, fp32)."""

import json

import pytest
from test_cli import run_cli

pytestmark = pytest.mark.slow


def run_json(args, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["run", "--limit", 2, "--dtype", "float32", "--out", tmp_path, "--json", *args], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


def test_prompt_lookup_is_lossless(tmp_path, capsys, monkeypatch):
    summary = run_json(["--drafter", "prompt-lookup", "--workload", "builtin", "--max-new-tokens", 64], tmp_path, capsys, monkeypatch)
    assert summary["exact_match_rate"] == 1.0
    assert summary["acceptance_rate"] is not None  # it drafted something


def test_self_drafting_accepts_every_token(tmp_path, capsys, monkeypatch):
    k = 3
    # 1 token from the prefill + 12 steps of k + 1: every step is a full draft unless EOS comes first
    summary = run_json(
        ["--drafter", "draft-model", "--draft-model", "smollm2-135m", "--k", k, "--max-new-tokens", 1 + 12 * (k + 1),
         "--workload", "builtin-completion"],
        tmp_path, capsys, monkeypatch,
    )
    assert summary["acceptance_rate"] == 1.0
    assert summary["tau"] == k + 1
    assert summary["exact_match_rate"] == 1.0


@pytest.mark.heavy
@pytest.mark.parametrize("drafter", ["medusa", "hydra", "hydra-decoder"])
def test_head_drafters_with_catalogue_defaults_are_lossless(drafter, tmp_path, capsys, monkeypatch):
    # smollm2-135m has no published heads: the catalogue gives the bundled trained Medusa and Hydra++ heads
    # (on CPU the trees tuned for it: smollm2_medusa_cpu_tuned, smollm2_hydra_cpu_pruned) and fresh, reference-initialised heads for hydra-decoder
    summary = run_json(["--drafter", drafter, "--workload", "builtin-completion", "--max-new-tokens", 24], tmp_path, capsys, monkeypatch)
    assert summary["exact_match_rate"] == 1.0
    assert summary["steps"] > 0 and summary["draft_ms_per_step"] > 0
    if drafter != "hydra-decoder":  # trained heads: some drafts are accepted
        assert summary["tau"] > 1
    (run_dir,) = tmp_path.iterdir()
    recorded = (run_dir / "run.json").read_text()
    # on a CPU the catalogue trims the bundled Medusa's and Hydra's LM heads (heads.toml vocab_trim_cpu), not the
    # fresh hydra-decoder's, and prunes Hydra's tree every step (prune_below_cpu)
    assert ('"vocab_trim": 2048' in recorded) == (drafter in ("medusa", "hydra"))
    assert ('"prune_below": 0.1' in recorded) == (drafter == "hydra")


@pytest.mark.heavy
def test_bundled_draft_model_is_the_default_and_lossless(tmp_path, capsys, monkeypatch):
    # no --draft-model: the catalogue's bundled, trained 1-layer draft (rebuilt from the target's embeddings)
    summary = run_json(["--drafter", "draft-model", "--workload", "builtin-completion", "--max-new-tokens", 24], tmp_path, capsys, monkeypatch)
    assert summary["exact_match_rate"] == 1.0 and summary["steps"] > 0
    (run_dir,) = tmp_path.iterdir()
    assert '"vocab_trim": 2048' in (run_dir / "run.json").read_text()  # on a CPU its catalogue entry trims its LM head


@pytest.mark.heavy
@pytest.mark.parametrize("drafter", ["draft-model", "medusa", "hydra"])
def test_vocab_trimmed_drafters_are_lossless(drafter, tmp_path, capsys, monkeypatch):
    # the bundled draft / heads with their LM head cut to the 2048 ids the target writes most often
    # (counted on builtin-completion's text); verification stays over all 49152, so greedy stays exact
    summary = run_json(["--drafter", drafter, "--vocab-trim", 2048, "--vocab-trim-from", "builtin-completion",
                        "--workload", "builtin", "--max-new-tokens", 32], tmp_path, capsys, monkeypatch)
    assert summary["exact_match_rate"] == 1.0 and summary["steps"] > 0
    (run_dir,) = tmp_path.iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert "2048" in json.dumps(info)
