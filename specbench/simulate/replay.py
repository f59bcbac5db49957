"""Step replay: the fallback for drafters without the teacher-forced hook.

The drafter is driven step by step along the logged sequence exactly as the
decode loop drives it (begin, propose, on_verified), with the log standing in
for the target: the accepted path is the one whose tokens equal the logged
continuation (the greedy rule of engine/acceptance.py), and the hidden states
handed to `on_verified` are the target's logged ones (zeros for rejected
nodes, which the loop's drafters never read). Its proposals are timed, which
is also how simulate measures draft latency for every drafter.
Results from this path are labelled "step replay".
"""

from __future__ import annotations

import torch

from specbench.engine.acceptance import accept_predicted
from specbench.engine.loop import Clock
from specbench.engine.protocol import DraftContext, VerifyOutcome
from specbench.records import StepMeasure


@torch.inference_mode()
def replay(
    drafter,
    prompt: torch.Tensor,
    output: list[int],
    max_new_tokens: int,
    cap: int | None = None,
    hidden: torch.Tensor | None = None,
    max_steps: int | None = None,
) -> list[StepMeasure]:
    """Steps of the loop over one logged sequence, with draft_ms measured.
    `cap` limits each draft to that many tokens (a chain's k) through ctx.max_tokens."""
    device = prompt.device
    p, n_out = prompt.numel(), len(output)
    sequence = torch.cat([prompt.reshape(-1), torch.tensor(output, device=device)])
    clock = Clock(device)
    drafter.begin(prompt.reshape(-1), hidden[:p] if hidden is not None else None)
    steps, m = [], 1
    while m < n_out and (max_steps is None or len(steps) < max_steps):
        remaining = max_new_tokens - m
        ctx = DraftContext(sequence[: p + m], p, min(cap, remaining) if cap else remaining, 0.0, None)
        t0 = clock.now()
        tree = drafter.propose(ctx)
        draft_ms = clock.now() - t0
        # the target's choice after the root and after each node, read from the log
        predicted = [output[m]] + [output[m + d] if m + d < n_out else -1 for d in tree.depths]
        result = accept_predicted(tree, predicted)
        accepted = result.accepted_nodes
        emitted = output[m : m + len(accepted) + 1]
        rows = None
        if hidden is not None:
            rows = hidden.new_zeros(len(tree) + 1, hidden.shape[-1])
            for row, position in enumerate([p + m - 1] + [p + m - 1 + d for d in range(1, len(accepted) + 1)]):
                if position < hidden.shape[0]:
                    rows[0 if row == 0 else accepted[row - 1] + 1] = hidden[position]
        drafter.on_verified(VerifyOutcome(tree, accepted, emitted, rows))
        steps.append(StepMeasure(draft_ms, 0.0, draft_ms, len(tree), tree.depth, min(len(accepted), n_out - m)))
        m += len(accepted) + 1
    return steps
