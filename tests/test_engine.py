"""The decode loop, tree verification, acceptance and KV compaction on tiny models."""

import pytest
import torch
from tiny import perturbed, prompts, tiny_llama, tiny_target
from transformers import DynamicCache

from specbench.drafters.draft_model import DraftModelDrafter
from specbench.drafters.prompt_lookup import PromptLookupDrafter
from specbench.engine import kv
from specbench.engine.acceptance import accept_greedy
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.engine.tree import DraftTree

MAX_NEW = 40


@pytest.fixture(scope="module")
def target():
    return tiny_target(0)


@pytest.fixture(scope="module")
def plain_outputs(target):
    return [decode(target, PlainDecoding(target), p, MAX_NEW).output_ids for p in prompts(20)]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_draft_model_greedy_equals_plain(target, plain_outputs, k):
    draft = perturbed(target.model, noise=0.01)
    accepted = []
    for prompt, expected in zip(prompts(20), plain_outputs):
        result = decode(target, DraftModelDrafter(target, draft, k=k), prompt, MAX_NEW)
        assert result.output_ids == expected
        accepted += [s.accepted for s in result.steps]
    # the draft must have been both right and wrong, or the test proves little
    assert 0 < sum(accepted) < k * len(accepted)
    assert any(a == k for a in accepted) and any(a < k for a in accepted)


def test_prompt_lookup_greedy_equals_plain(target, plain_outputs):
    drafted = 0
    for prompt, expected in zip(prompts(20), plain_outputs):
        result = decode(target, PromptLookupDrafter.build(target, k=4, min_ngram=1), prompt, MAX_NEW)
        assert result.output_ids == expected
        drafted += sum(s.tree_size for s in result.steps)
    assert drafted > 0


def test_self_drafting_accepts_everything(target):
    k = 3
    for prompt in prompts(5):
        result = decode(target, DraftModelDrafter(target, target.model, k=k), prompt, MAX_NEW)
        assert all(s.accepted == s.tree_size for s in result.steps)
        full = [s for s in result.steps if s.tree_size == k]
        assert full and all(s.accepted == k for s in full)


def test_plain_decoding_matches_transformers_generate(target):
    prompt = prompts(1)[0]
    ours = decode(target, PlainDecoding(target), prompt, 20).output_ids
    generated = target.model.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    reference = generated[0, prompt.numel() :].tolist()
    cut = reference.index(2) + 1 if 2 in reference else len(reference)  # we stop at EOS (id 2)
    assert ours == reference[:cut]


def test_max_new_tokens_and_eos_truncate(target):
    for prompt in prompts(10):
        out = decode(target, DraftModelDrafter(target, target.model, k=5), prompt, 7).output_ids
        assert len(out) <= 7
        if 2 in out:
            assert out.index(2) == len(out) - 1


# --- hand-built trees -------------------------------------------------------

def one_hot_rows(predictions, vocab=16):
    logits = torch.zeros(len(predictions), vocab)
    for row, token in enumerate(predictions):
        logits[row, token] = 1.0
    return logits


def test_greedy_acceptance_on_hand_built_tree():
    #            root
    #          /      \
    #     n0:5         n1:7
    #      |          /    \
    #     n2:9     n3:3    n4:4
    #                        |
    #                       n5:8
    tree = DraftTree(torch.tensor([5, 7, 9, 3, 4, 8]), torch.tensor([-1, -1, 0, 1, 1, 4]))
    assert tree.depths == [1, 1, 2, 2, 2, 3]
    # target argmax after: root->7, n0->9, n1->4, n2->1, n3->0, n4->8, n5->11
    logits = one_hot_rows([7, 9, 4, 1, 0, 8, 11])
    result = accept_greedy(tree, logits)
    assert result.accepted_nodes == [1, 4, 5]  # root -> 7 -> 4 -> 8
    assert result.bonus == 11
    # root's argmax matches nothing: nothing accepted, the bonus is the correction
    result = accept_greedy(tree, one_hot_rows([2, 9, 4, 1, 0, 8, 11]))
    assert result.accepted_nodes == [] and result.bonus == 2


def test_greedy_tie_takes_first_path_and_lowest_token():
    # two identical branches: the first in node order wins
    tree = DraftTree(torch.tensor([5, 5, 6, 6]), torch.tensor([-1, -1, 0, 1]))
    logits = one_hot_rows([5, 6, 6, 3, 4])
    assert accept_greedy(tree, logits).accepted_nodes == [0, 2]
    tie = torch.zeros(1, 16)
    tie[0, [9, 4]] = 1.0  # equal maxima: the lowest id, as in plain decoding
    assert accept_greedy(DraftTree.empty(), tie).bonus == 4


def test_ancestor_mask():
    tree = DraftTree(torch.tensor([5, 7, 9, 3]), torch.tensor([-1, -1, 0, 1]))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # root
            [1, 1, 0, 0, 0],  # n0
            [1, 0, 1, 0, 0],  # n1
            [1, 1, 0, 1, 0],  # n2 (child of n0)
            [1, 0, 1, 0, 1],  # n3 (child of n1)
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.ancestor_mask(), expected)


def test_tree_rejects_parent_after_child():
    with pytest.raises(ValueError):
        DraftTree(torch.tensor([1, 2]), torch.tensor([1, -1]))


def test_kv_compact_moves_the_accepted_slots_into_place():
    cache = DynamicCache()
    keys = torch.arange(10, dtype=torch.float64).reshape(1, 1, 10, 1)
    cache.update(keys.clone(), keys.clone() * 10, 0)
    kv.compact(cache, base=4, keep=[0, 2, 5])  # root at 4, nodes at 6 and 9
    assert cache.layers[0].keys.flatten().tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert cache.layers[0].values.flatten().tolist() == [0, 10, 20, 30, 40, 60, 90]


def test_tree_verify_and_commit_equal_sequential_decoding(target):
    """Verifying a tree and keeping one path leaves exactly the KV and logits
    that feeding that path token by token would have produced."""
    prompt = prompts(1, seed=7)[0]
    root = 11
    tree = DraftTree(torch.tensor([20, 21, 22, 23, 24]), torch.tensor([-1, -1, 0, 1, 3]))
    path = [1, 3, 4]  # root -> 21 -> 23 -> 24

    target.prefill(prompt)
    logits, _ = target.verify(root, tree)
    target.commit(path)
    tree_keys = [layer.keys.clone() for layer in target.cache.layers]

    sequence = torch.cat([prompt, torch.tensor([root, 21, 23, 24])])
    reference_logits, _ = target.prefill(sequence)
    rows = [0] + [n + 1 for n in path]  # root, then each path node's row
    torch.testing.assert_close(logits[rows], reference_logits[prompt.numel() :], rtol=0, atol=1e-10)
    for mine, reference in zip(tree_keys, target.cache.layers):
        torch.testing.assert_close(mine, reference.keys, rtol=0, atol=1e-10)
    assert target.seq_len == sequence.numel()


def test_draft_model_rolls_its_cache_back(target):
    draft = perturbed(target.model, noise=0.01)
    drafter = DraftModelDrafter(target, draft, k=4)
    for prompt in prompts(3):
        result = decode(target, drafter, prompt, 30)
        sequence = prompt.tolist() + result.output_ids
        # the draft's cache holds a prefix of the final sequence plus at most k-1 drafted tokens
        assert drafter.cached[: len(sequence) - 1] == sequence[: len(drafter.cached)][: len(sequence) - 1]
        assert all(layer.keys.shape[-2] == len(drafter.cached) for layer in drafter.cache.layers)


def test_draft_model_rejects_other_vocabulary(target):
    from specbench.errors import UserError

    with pytest.raises(UserError, match="vocabulary mismatch"):
        DraftModelDrafter(target, tiny_llama(3, vocab=80), k=2)


def test_counted_gives_the_events_inside_its_block_even_when_it_raises():
    from specbench.engine.events import EVENTS, counted

    EVENTS.captures += 2  # before the block: not counted
    with pytest.raises(RuntimeError), counted() as seen:
        EVENTS.captures, EVENTS.capture_ms, EVENTS.regrowths = EVENTS.captures + 3, EVENTS.capture_ms + 1.5, EVENTS.regrowths + 1
        raise RuntimeError("a crash inside the timed block")
    assert (seen.captures, seen.capture_ms, seen.compiles, seen.regrowths) == (3, 1.5, 0, 1) and seen
    with counted() as quiet:
        pass
    assert not quiet


def test_engine_facts_keep_the_warm_up_and_add_what_was_timed():
    """run.json's engine entry (and gpu_check's cells): the warm-up's counts replace the last ones (a resumed
    run warms up again); a timed prompt with events adds them and is named, one without is not."""
    from specbench.engine.events import EngineEvents
    from specbench.records import EngineFacts

    facts = EngineFacts()
    facts.set_warm_up(EngineEvents(captures=4, capture_ms=10.12345, compiles=1, compile_ms=2.0))
    facts.set_warm_up(EngineEvents(captures=2, capture_ms=1.0))
    assert (facts.graphs, facts.capture_ms, facts.compiles, facts.compile_ms) == (2, 1.0, 0, 0.0)
    facts.add_timed(EngineEvents(), "quiet")
    facts.add_timed(EngineEvents(captures=1, capture_ms=0.5, regrowths=2), "p1")
    facts.add_timed(EngineEvents(compiles=3, compile_ms=1.25), "p2")
    assert (facts.timed_captures, facts.timed_capture_ms, facts.timed_regrowths) == (1, 0.5, 2)
    assert (facts.timed_compiles, facts.timed_compile_ms, facts.timed_capture_prompts) == (3, 1.25, ["p1", "p2"])
