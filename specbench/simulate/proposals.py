"""What a drafter would propose along a logged sequence, from one teacher-forced pass.

While a greedy drafter's proposals match the target, its context *is* the
target's prefix. So one pass of the drafter over the logged sequence gives, at
every step the online loop could take, the rank of each true next token under
each draft position; acceptance for any chain length or tree follows from the
ranks alone (see `walk`).

Indexing: the logged output is out[0..N-1] (out[0] comes from the prefill). At
the step taken when m tokens have been emitted (root = out[m-1]), draft
position i (1-based) is scored against the true token out[m+i-1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# rank of a true token the drafter did not propose (or that lies past the log's end)
RANK_NONE = 1 << 30


@dataclass
class TeacherForced:
    # [N, D] int64: ranks[m, i-1] = rank (0 = first choice) of out[m+i-1] under draft
    # position i at the step with m tokens emitted; RANK_NONE where it was not proposed
    # or lies past the end of the log. Row 0 is never used (out[0] is the prefill's).
    ranks: torch.Tensor
    # [N] how many chain positions the drafter would propose at step m when allowed
    # D (prompt lookup may find fewer or none); None: always D
    lengths: torch.Tensor | None = None
    # True when ranks order the drafter's whole distribution (trees can be scored);
    # False when the drafter proposes one token per position (ranks are 0 or RANK_NONE)
    ranked: bool = True
    hidden_source: str | None = None  # where the target hidden states came from, if used

    @property
    def depth(self) -> int:
        return self.ranks.shape[1]


# hidden(): the target's final hidden states over prompt + output[:-1] ([P+N-1, H])
# and a description of where they came from ("log side file ...", "teacher-forced target forward")
HiddenProvider = Callable[[], tuple[torch.Tensor, str]]


def true_ranks(logits: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Rank of `true[t]` in `logits[t]` (ties break to the lower id, as greedy argmax does);
    RANK_NONE where true[t] < 0 (a token the drafter cannot propose)."""
    logits = logits.float()
    valid = true >= 0
    index = true.clamp(min=0)
    chosen = logits.gather(1, index[:, None])
    ids = torch.arange(logits.shape[1], device=logits.device)
    rank = (logits > chosen).sum(1) + ((logits == chosen) & (ids[None] < index[:, None])).sum(1)
    return torch.where(valid, rank, torch.full_like(rank, RANK_NONE)).long().cpu()


def autoregressive_ranks(position_ranks: torch.Tensor, prompt_len: int, n_out: int, depth: int) -> torch.Tensor:
    """[N, depth] ranks for an autoregressive drafter from its per-position ranks.

    position_ranks[t] is the rank of sequence[t+1] given sequence[:t+1] (t = 0..P+N-2).
    Draft position i at step m continues the true prefix of length P+m+i-1, so its rank
    is position_ranks[P+m+i-2], i.e. the rank of out[m+i-1]."""
    of_output = position_ranks[prompt_len - 1 :]  # [N]: rank of out[j]
    padded = torch.cat([of_output, torch.full((depth,), RANK_NONE, dtype=torch.long)])
    return padded.unfold(0, depth, 1)[:n_out].clone()
