"""Run under the `deepspeed` launcher by tests/test_deepspeed.py:

    deepspeed --num_gpus 2 --no_local_rank tests/deepspeed_worker.py MODEL_DIR DRAFT_DIR TP OUT.json [ENGINE]

Rank 0 compares the tensor-parallel target (on ENGINE: eager or fast) with the
same model in one process (transformers, no DeepSpeed): logits at prefill and
over verified trees, and the greedy tokens of plain decoding and of draft-model
speculative decoding. The other ranks follow rank 0's target calls, as in
`specbench run` (targets/parallel.py).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import prompts  # noqa: E402

from specbench.drafters.draft_model import DraftModelDrafter  # noqa: E402
from specbench.engine.loop import decode  # noqa: E402
from specbench.engine.protocol import PlainDecoding  # noqa: E402
from specbench.engine.tree import DraftTree  # noqa: E402
from specbench.targets import deepspeed  # noqa: E402
from specbench.targets.hf import HFTarget  # noqa: E402
from specbench.targets.loading import load_causal_lm  # noqa: E402
from specbench.targets.parallel import tensor_parallel  # noqa: E402

PROMPTS, MAX_NEW, K = 6, 32, 3


def main() -> None:
    model_dir, draft_dir, tp, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    engine = sys.argv[5] if len(sys.argv) > 5 else "eager"
    cpu = torch.device("cpu")
    with tensor_parallel(deepspeed.load(model_dir, cpu, torch.float32, tp, engine)) as target:
        if target is not None:  # the leading rank; the others served its calls
            compare(target, model_dir, draft_dir, tp, engine, out)


def compare(target, model_dir: str, draft_dir: str, tp: int, engine: str, out: Path) -> None:
    cpu = torch.device("cpu")
    reference = HFTarget.load(model_dir, cpu, torch.float32)
    draft, _, _ = load_causal_lm(draft_dir, cpu, torch.float32)
    tree = DraftTree(torch.tensor([5, 9, 7, 11]), torch.tensor([-1, 0, 0, 1]))
    logit_diff = 0.0
    for prompt in prompts(PROMPTS):
        # prefill, verify a branching tree, keep one path of it, verify again
        pairs = [(target.prefill(prompt)[0], reference.prefill(prompt)[0])]
        pairs.append((target.verify(3, tree)[0], reference.verify(3, tree)[0]))
        target.commit([0, 2]), reference.commit([0, 2])
        pairs.append((target.verify(8, tree)[0], reference.verify(8, tree)[0]))
        logit_diff = max(logit_diff, *((a - b).abs().max().item() for a, b in pairs))
    plain_same = spec_same = 0
    for prompt in prompts(PROMPTS):
        expected = decode(reference, PlainDecoding(reference), prompt, MAX_NEW).output_ids
        plain = decode(target, PlainDecoding(target), prompt, MAX_NEW).output_ids
        spec = decode(target, DraftModelDrafter(target, draft, k=K), prompt, MAX_NEW).output_ids
        plain_same += plain == expected
        spec_same += spec == expected
    result = {"tp": tp, "engine": target.engine, "prompts": PROMPTS, "max_logit_diff": logit_diff, "plain_exact": plain_same,
              "spec_exact": spec_same}
    out.write_text(json.dumps(result))




if __name__ == "__main__":
    main()
