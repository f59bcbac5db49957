"""VocabTrim: a trimmed drafter head keeps greedy decoding exact, and never drafts a token outside its set."""

import json
from pathlib import Path

import pytest
import torch
from tiny import perturbed, prompts, tiny_target

from specbench.catalogue import catalogue
from specbench.drafters.draft_model import DraftModelDrafter
from specbench.drafters.vocab_trim import TrimmedHead, keep_ids, ranked_ids, save_ids
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.errors import UserError
from specbench.targets.hf import forward_bytes


@pytest.fixture(scope="module")
def target():
    return tiny_target(0)


def trimmed_drafter(target, kept, k=4):
    draft = perturbed(target.model, noise=0.01)
    return DraftModelDrafter(target, draft, k=k, trim=TrimmedHead(draft.get_output_embeddings(), torch.tensor(kept)))


def test_trimmed_greedy_equals_plain_and_drafts_only_kept_ids(target):
    plain = [decode(target, PlainDecoding(target), p, 40).output_ids for p in prompts(20)]
    # keep the ids the target emits most, minus its single most frequent one
    counts = torch.bincount(torch.tensor([t for out in plain for t in out]), minlength=target.vocab_size)
    ranked = ranked_ids({i: int(c) for i, c in enumerate(counts) if c}, target.vocab_size)
    excluded = ranked[0]
    kept = sorted(ranked[1:30])
    drafter = trimmed_drafter(target, kept)
    drafted_ids, accepted = set(), 0
    original_propose = drafter.propose

    def spy(ctx):
        tree = original_propose(ctx)
        drafted_ids.update(tree.tokens.tolist())
        return tree

    drafter.propose = spy
    for prompt, expected in zip(prompts(20), plain):
        result = decode(target, drafter, prompt, 40)
        assert result.output_ids == expected
        accepted += sum(s.accepted for s in result.steps)
    assert drafted_ids <= set(kept)
    assert excluded not in drafted_ids
    assert sum(out.count(excluded) for out in plain) > 0  # ...and still emitted, as the correction token
    assert accepted > 0


def test_trimmed_sampling_gives_zero_probability_outside_the_set(target):
    kept = list(range(10, 40))
    drafter = trimmed_drafter(target, kept, k=3)
    drafter.begin(None, None)
    from specbench.engine.protocol import DraftContext

    ctx = DraftContext(prompts(1)[0], 5, 10, 1.0, torch.Generator().manual_seed(0))
    tree = drafter.propose(ctx)
    assert tree.draft_probs.shape == (3, target.vocab_size)
    outside = torch.ones(target.vocab_size, dtype=torch.bool)
    outside[kept] = False
    assert torch.all(tree.draft_probs[:, outside] == 0)
    torch.testing.assert_close(tree.draft_probs.sum(-1), torch.ones(3, dtype=tree.draft_probs.dtype))


def test_keep_ids_from_a_run_directory(tmp_path, target):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "run_id": "r", "command": "", "target": "t", "target_id": "t", "drafter": "d", "drafter_options": {},
        "workload": "w", "workload_hash": "h", "decode": {}, "environment": {}, "started": "",
    }))
    rows = [
        {"prompt_id": "a", "turn": 0, "mode": "baseline", "category": "c", "prompt_tokens": 1, "new_tokens": 4,
         "steps": 3, "wall_ms": 1.0, "ttft_ms": 1.0, "output_ids": [7, 7, 7, 5]},
        {"prompt_id": "a", "turn": 0, "mode": "spec", "category": "c", "prompt_tokens": 1, "new_tokens": 2,
         "steps": 1, "wall_ms": 1.0, "ttft_ms": 1.0, "output_ids": [9, 9]},
    ]
    (run / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, info = keep_ids(2, str(run), None, target.vocab_size)
    assert kept.tolist() == [5, 7]  # the baseline's own generations, not the spec outputs
    assert info["vocab_trim"] == 2 and info["counted_from"] == f"run {run}"
    # saved lists are reused, and refused for another vocabulary
    ids_file = tmp_path / "ids.json"
    save_ids(ids_file, ranked_ids({7: 3, 5: 1}, target.vocab_size), "t", target.vocab_size, "test")
    assert keep_ids(1, str(ids_file), None, target.vocab_size)[0].tolist() == [7]
    with pytest.raises(UserError, match="rebuild it for this target"):
        keep_ids(1, str(ids_file), None, target.vocab_size + 1)


def test_forward_bytes_counts_the_trimmed_head(target):
    model = target.model
    head = model.get_output_embeddings().weight
    full = forward_bytes(model)
    trimmed = forward_bytes(model, TrimmedHead(model.get_output_embeddings(), torch.arange(10)))
    row_bytes = head.shape[1] * head.element_size()
    assert full - trimmed == (head.shape[0] - 10) * row_bytes
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    assert full == everything - model.get_input_embeddings().weight.numel() * row_bytes // head.shape[1]


def test_the_catalogue_trims_where_its_entry_says_for_the_device_and_the_user_overrides_it():
    from dataclasses import replace
    from types import SimpleNamespace

    from specbench.catalogue import drafter_entry
    from specbench.drafters.catalogued import catalogued_trim
    from specbench.drafters.heads.base import HeadOptions as HydraOptions
    from specbench.drafters.vocab_trim import load_ids

    entry = drafter_entry("hydra", "smollm2-135m")
    cpu, cuda = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("meta"))
    trimmed = catalogued_trim(entry, cpu, HydraOptions())
    assert trimmed.vocab_trim == 2048 and trimmed.vocab_trim_from.endswith("smollm2-135m-pool-train.json")
    ids, _ = load_ids(Path(trimmed.vocab_trim_from), 49152)  # the id list ships with the package
    assert len(ids) == 2048
    assert catalogued_trim(entry, cuda, HydraOptions()).vocab_trim is None  # another device: the whole vocabulary
    assert catalogued_trim({}, cpu, HydraOptions()).vocab_trim is None  # no entry: none
    mine = replace(HydraOptions(), vocab_trim=512, vocab_trim_from="builtin")
    assert catalogue_kept(catalogued_trim(entry, cpu, mine)) == (512, "builtin")  # the user's own
    assert catalogued_trim(entry, cpu, replace(HydraOptions(), vocab_trim=0)).vocab_trim == 0  # none, asked
    medusa = catalogued_trim(drafter_entry("medusa", "smollm2-135m"), cpu, HydraOptions())  # the bundled Medusa's too
    assert catalogue_kept(medusa) == catalogue_kept(trimmed)
    assert catalogued_trim(drafter_entry("hydra-decoder", "smollm2-135m"), cpu, HydraOptions()).vocab_trim is None  # fresh heads: none


def catalogue_kept(options):
    return options.vocab_trim, options.vocab_trim_from


def test_vocab_trim_zero_keeps_the_whole_vocabulary(target):
    from dataclasses import replace

    from specbench.drafters.heads.base import HeadOptions as HydraOptions
    from specbench.drafters.vocab_trim import asked_trim

    assert asked_trim(replace(HydraOptions(), vocab_trim=0, vocab_trim_from="builtin"), target) is None


def test_the_catalogues_default_draft_is_trimmed_where_its_entry_says_and_a_draft_given_by_name_is_not(target, monkeypatch, tmp_path):
    """`--drafter draft-model` without --draft-model takes the catalogue's default draft and, on this
    device type, its entry's VocabTrim (draft_models.toml `vocab_trim_cpu`); a draft named on the
    command line is drafted over the whole vocabulary unless --vocab-trim says otherwise."""
    from specbench.drafters.draft_model import DraftModelOptions

    ids = tmp_path / "ids.json"
    save_ids(ids, list(range(3, 43)), target.name, target.vocab_size, "a test")
    entry = {"default_for": [target.name], "vocab_trim_cpu": 40, "vocab_trim_from": str(ids)}
    catalogue_default_draft(monkeypatch, target, entry)
    default = DraftModelDrafter.create(target, DraftModelOptions())
    assert default.trim is not None and default.trim_info["vocab_trim"] == 40
    named = DraftModelDrafter.create(target, DraftModelOptions(draft_model="the-default"))
    assert named.trim is None
    assert DraftModelDrafter.create(target, DraftModelOptions(vocab_trim=0)).trim is None  # none, asked


def test_the_catalogues_default_draft_drafts_its_entrys_k_for_the_device_and_the_user_overrides_it(target, monkeypatch):
    """draft_models.toml `k_cpu`: the default draft's chain on a CPU; a draft named on the command line,
    or an entry without it, drafts k = 4; `--k` wins over both."""
    from specbench.drafters.draft_model import DraftModelOptions

    entry = {"default_for": [target.name], "k_cpu": 2}
    catalogue_default_draft(monkeypatch, target, entry)
    assert DraftModelDrafter.create(target, DraftModelOptions()).k == 2
    assert DraftModelDrafter.create(target, DraftModelOptions(k=3)).k == 3
    assert DraftModelDrafter.create(target, DraftModelOptions(draft_model="the-default")).k == 4
    entry.pop("k_cpu")
    assert DraftModelDrafter.create(target, DraftModelOptions()).k == 4
    assert catalogue("draft_models")["smollm2-135m-draft"]["k_cpu"] == 2  # the bundled draft's, chosen on pool-train


def catalogue_default_draft(monkeypatch, target, entry: dict) -> None:
    """The catalogue's draft_models as one entry, 'the-default', for `target`, loading as a perturbed
    copy of the target (no file read)."""
    from specbench.drafters import draft_model
    from specbench.targets import loading

    real_catalogue = draft_model.catalogue
    monkeypatch.setattr(draft_model, "catalogue", lambda name: {"the-default": entry} if name == "draft_models" else real_catalogue(name))
    draft = perturbed(target.model, noise=0.01)
    monkeypatch.setattr(loading, "load_causal_lm", lambda name, *args, **kwargs: (draft, target.tokenizer,
                                                                                  type("Source", (), {"model_id": name})()))
