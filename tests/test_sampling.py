"""Speculative sampling is lossless in distribution: chi-square goodness of fit
of sampled outputs against the target's exact distribution."""


import pytest
import torch
from tiny import perturbed, tiny_target

from specbench.drafters.draft_model import DraftModelDrafter
from specbench.engine.acceptance import accept_speculative_sampling
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.engine.tree import DraftTree


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Statistic and degrees of freedom; bins with small expected counts are pooled into one."""
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


# chi-square critical values at p = 0.001
CRITICAL = {5: 20.52, 6: 22.46, 7: 24.32}


def critical(df: int) -> float:
    if df in CRITICAL:
        return CRITICAL[df]
    # Wilson-Hilferty approximation of the 0.999 quantile
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_rule_emits_the_target_distribution(deterministic_draft):
    generator = torch.Generator().manual_seed(0)
    target_logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0], [0.0] * 6])
    p = torch.softmax(target_logits[0], -1)
    q = torch.softmax(torch.tensor([0.0, 1.5, 0.5, -1.0, 1.0, 0.0]), -1)
    counts = torch.zeros(6)
    trials = 20000
    for _ in range(trials):
        if deterministic_draft:  # e.g. prompt lookup: always proposes token 1, q is one-hot
            tree = DraftTree.chain(torch.tensor([1]))
        else:
            token = int(torch.multinomial(q, 1, generator=generator))
            tree = DraftTree.chain(torch.tensor([token]), q[None])
        result = accept_speculative_sampling(tree, target_logits, 1.0, generator)
        first = int(tree.tokens[0]) if result.accepted_nodes else result.bonus
        counts[first] += 1
    stat, df = chi_square(counts, p)
    assert stat < critical(df), (stat, df, counts / trials, p)


def exact_joint_of_second_and_third(target, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(t2, t3) of plain sampling, summed over t1, computed from the target's logits."""
    vocab = target.vocab_size
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    probs = lambda seq: torch.softmax(target.prefill(seq)[0][-1].double() / temperature, -1)  # noqa: E731
    p1 = probs(prompt)
    for t1 in range(vocab):
        p2 = probs(torch.cat([prompt, torch.tensor([t1])]))
        for t2 in range(vocab):
            p3 = probs(torch.cat([prompt, torch.tensor([t1, t2])]))
            joint[t2] += p1[t1] * p2[t2] * p3
    return joint.flatten()


@pytest.mark.parametrize("mode", ["speculative", "plain"])
def test_sampled_decoding_matches_plain_distribution(mode):
    temperature = 1.0
    target = tiny_target(5, vocab=8, std=0.15)
    target.eos_token_ids = set()  # every sample runs the full 3 tokens
    prompt = torch.tensor([3, 4, 5, 3, 4])
    exact = exact_joint_of_second_and_third(target, prompt, temperature)
    drafter = PlainDecoding(target)
    if mode == "speculative":
        drafter = DraftModelDrafter(target, perturbed(target.model, noise=0.15), k=2)
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(64, dtype=torch.float64)
    accepted = 0
    for _ in range(2000):
        result = decode(target, drafter, prompt, 3, temperature, generator)
        t2, t3 = result.output_ids[1:3]
        counts[t2 * 8 + t3] += 1
        accepted += sum(s.accepted for s in result.steps)
    if mode == "speculative":
        assert 0 < accepted < 2 * 2000  # both acceptances and rejections happened
    stat, df = chi_square(counts, exact)
    assert stat < critical(df), (stat, df)
