"""The fast engine's static cache and buckets on the embedded SmolLM2-135M (CPU, fp32, not compiled:
tests/test_cpu_engine.py compiles tiny models): the same greedy tokens as the eager engine."""

import pytest
import torch
from tiny import perturbed

from specbench.drafters.draft_model import DraftModelDrafter
from specbench.drafters.prompt_lookup import PromptLookupDrafter
from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding
from specbench.targets.fast import FastHFTarget
from specbench.targets.hf import HFTarget
from specbench.targets.loading import load_causal_lm
from specbench.workloads import encode_turn, load_workload

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def test_fast_equals_eager_on_smollm2():
    model, tokenizer, _ = load_causal_lm("smollm2-135m", torch.device("cpu"), torch.float32)
    draft = perturbed(model, noise=0.003)  # agrees often, not always
    eager, fast = HFTarget(model, tokenizer), FastHFTarget(model, tokenizer, bucketed=True, compiled=False)
    drafters = {
        "plain": lambda t: PlainDecoding(t),
        "prompt-lookup": lambda t: PromptLookupDrafter(t),
        "draft-model": lambda t: DraftModelDrafter(t, draft, k=4, tokenizer=tokenizer),
    }
    accepted = drafted = 0
    for prompt in load_workload("builtin")[:2]:
        ids = torch.tensor(encode_turn(tokenizer, prompt, 0, []))
        for name, make in drafters.items():
            expected = decode(eager, make(eager), ids, 48)
            got = decode(fast, make(fast), ids, 48)
            assert got.output_ids == expected.output_ids, name
            if name == "draft-model":
                accepted += sum(s.accepted for s in got.steps)
                drafted += sum(s.tree_size for s in got.steps)
    assert 0 < accepted < drafted  # the draft was both right and wrong
