"""Tensor parallelism as a wrapper around a run, not a property of every target.

With N ranks each process holds a shard of the target (targets/deepspeed.py),
and every forward needs all of them (their all-reduces). Rank 0 leads: it
runs the whole benchmark (drafting, acceptance, records, output) against a
`LeaderTarget`, which broadcasts each target call before making it. The
other ranks follow: they receive each call and make the same one on their
shard, until the leader stops them. Followers never build a benchmark.

    with tensor_parallel(target) as leading:
        if leading is None:
            return  # a follower: it served the leader's run and is done
        ...measure with `leading`...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from specbench.engine.protocol import Taps, Target
from specbench.engine.tree import DraftTree

PREFILL, VERIFY, COMMIT, WARM_UP, STOP = range(5)
_NO_TAP = -1  # a None tap (the final normed state) on the wire
_HEADER = 5  # op, root / rows, max_positions, tokens, taps


def _encode_taps(taps: Taps) -> list[int]:
    return [_NO_TAP if t is None else t for t in taps]


def _decode_taps(values: list[int]) -> Taps:
    return tuple(None if v == _NO_TAP else v for v in values)


class LeaderTarget:
    """The leading rank's target: the wrapped target's contract, each call broadcast first."""

    def __init__(self, inner: Target) -> None:
        self.inner = inner
        self._stopped = False

    def __getattr__(self, name: str):  # identity, sizes, weights: the wrapped target's
        return getattr(self.inner, name)

    def _send(self, op: int, scalar: int = 0, max_positions: int = 0, tokens: list[torch.Tensor] = (), taps: Taps = ()) -> None:
        device = self.inner.device
        n = tokens[0].numel() if tokens else 0
        dist.broadcast(torch.tensor([op, scalar, max_positions, n, len(taps)], device=device), src=0)
        payload = [t.reshape(-1).to(device, torch.long) for t in tokens]
        if taps:
            payload.append(torch.tensor(_encode_taps(taps), device=device))
        if sum(p.numel() for p in payload):  # followers skip an empty payload too
            dist.broadcast(torch.cat(payload), src=0)

    def prefill(self, prompt: torch.Tensor, taps: Taps = (), max_positions: int | None = None):
        self._send(PREFILL, 0, max_positions or 0, [prompt], taps)
        return self.inner.prefill(prompt, taps, max_positions)

    def verify(self, root: int, tree: DraftTree, taps: Taps = ()):
        self._send(VERIFY, root, 0, [tree.tokens, tree.parents], taps)
        return self.inner.verify(root, tree, taps)

    def commit(self, accepted_nodes: list[int]) -> None:
        self._send(COMMIT, 0, 0, [torch.tensor(accepted_nodes, dtype=torch.long)])
        self.inner.commit(accepted_nodes)

    def warm_up(self, max_rows: int, taps: Taps = (), max_positions: int | None = None) -> float:
        self._send(WARM_UP, max_rows, max_positions or 0, [], taps)  # captures happen on every rank together
        return self.inner.warm_up(max_rows, taps, max_positions)

    def stop(self) -> None:
        """Release the followers (once; safe to call again)."""
        if not self._stopped:
            self._stopped = True
            self._send(STOP)


def follow(target: Target) -> None:
    """A follower's whole job: make the leader's target calls on this shard until it stops."""
    device = target.device
    while True:
        header = torch.empty(_HEADER, dtype=torch.long, device=device)
        dist.broadcast(header, src=0)
        op, scalar, max_positions, n, n_taps = header.tolist()
        if op == STOP:
            return
        parts = 2 if op == VERIFY else 1 if n else 0
        payload = torch.empty(n * parts + n_taps, dtype=torch.long, device=device)
        if payload.numel():
            dist.broadcast(payload, src=0)
        taps = _decode_taps(payload[n * parts :].tolist())
        if op == PREFILL:
            target.prefill(payload[:n], taps, max_positions or None)
        elif op == VERIFY:
            target.verify(scalar, DraftTree(payload[:n], payload[n : 2 * n]), taps)
        elif op == COMMIT:
            target.commit(payload[:n].tolist())
        elif op == WARM_UP:
            target.warm_up(scalar, taps, max_positions or None)


def _leave_group() -> None:
    """Every rank leaves the process group together before exiting: a rank that exits with
    gloo's threads still up intermittently died in std::terminate ("terminate called without
    an active exception"), failing the launcher's run after all results were written."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def tensor_parallel(target: Target) -> Iterator[Target | None]:
    """The target to run with on the leading rank; None on a follower, after it has served the
    whole run. A single process (no group, or a group of one) just gets its target back."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield target
        return
    if dist.get_rank() != 0:
        try:
            follow(target)
        finally:
            _leave_group()
        yield None
        return
    leader = LeaderTarget(target)
    try:
        yield leader
    finally:
        leader.stop()
        _leave_group()
