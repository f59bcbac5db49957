"""Throughput predicted from a latency model: per step, draft ms + verify ms(tokens).

Two models:
- `profile`: the target's measured verify latency by tokens per forward (the
  log's profile or `--profile FILE`), and the drafter's draft ms per step
  measured by timing its proposals along the log (see replay.py).
- `roofline`: memory-bound decoding at `--bandwidth` GB/s: a forward costs the
  bytes of weights it reads / bandwidth, whatever its token count (n <= 128);
  the draft costs its bytes × sequential passes / bandwidth.
The model ignores acceptance/KV bookkeeping (a few % of a step online).

At batch size B (`--batch-size B`, docs/batch.md) the profile's t(B, n) (`profile --batch`) costs
a step that verifies every row's root + tree; τ per row is the batch-1 τ (a row's steps do not
depend on its batch, greedy), so one row's predicted tokens/s is Σ(accepted + 1) / Σ(draft(B) +
t(B, n + 1)) over the walked steps, and the aggregate is B times that (every row busy, as with
refill). draft(B) is the drafter's ms per step for one row times B where it proposes row by row,
once where it batches its draft forwards across rows (overrides `propose_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

from specbench.checks import check_number
from specbench.errors import UserError
from specbench.records import StepMeasure
from specbench.simulate.log import VerifyProfile


@dataclass
class LatencyModel:
    kind: str  # "profile" | "roofline"
    profile: VerifyProfile | None = None
    bandwidth_gb_s: float | None = None
    target_bytes: int | None = None
    rows: int = 1  # the batch size B the profile's forwards hold
    draft_rows: int = 1  # how many times a batch step pays one row's draft ms (B row by row, 1 batched)

    @staticmethod
    def build(profile: VerifyProfile | None, bandwidth_gb_s: float | None, target_bytes: int | None, rows: int = 1,
              drafter=None, where: str = "the profile") -> LatencyModel:
        """The latency model at batch size `rows` (t(rows, n) from the profile; `drafter`, a class,
        says whether its draft forwards are batched across rows)."""
        if rows > 1:
            if bandwidth_gb_s is not None:
                raise UserError(f"--batch-size {rows} predicts from a profile of {rows}-row forwards, not a roofline: "
                                f"drop --bandwidth and pass --profile FILE from `specbench profile --batch 1,{rows}`")
            if profile is None:
                raise UserError(f"--batch-size {rows} needs a verify-latency profile of {rows}-row forwards: "
                                f"pass --profile FILE from `specbench profile --batch 1,{rows}`")
            return LatencyModel("profile", profile=profile.at_batch(rows, where), rows=rows, draft_rows=draft_rows(drafter, rows))
        if bandwidth_gb_s is not None:
            check_number(bandwidth_gb_s, "--bandwidth", above=0)
            if not target_bytes:
                raise UserError("--bandwidth needs the target's weight bytes, which this log does not record; pass --profile FILE instead")
            return LatencyModel("roofline", bandwidth_gb_s=bandwidth_gb_s, target_bytes=target_bytes)
        if profile is None:
            raise UserError("no verify-latency profile: the log has none; pass --profile FILE (from `specbench profile`) or --bandwidth GB/S")
        return LatencyModel("profile", profile=profile)

    def bytes_ms(self, nbytes: float) -> float:
        return nbytes / (self.bandwidth_gb_s * 1e9) * 1000

    def verify_ms(self, tokens: int) -> float:
        if self.kind == "roofline":
            return self.bytes_ms(self.target_bytes)
        return self.profile.verify_ms(tokens)

    def prefill_ms(self, prompt_tokens: int, logged_ttft_ms: float | None) -> float:
        if self.kind == "roofline":
            return self.bytes_ms(self.target_bytes)
        return logged_ttft_ms if logged_ttft_ms is not None else self.profile.verify_ms(prompt_tokens)

    def draft_ms(self, measured_ms: float, draft_bytes: int, passes: int) -> float:
        return self.bytes_ms(draft_bytes * passes) if self.kind == "roofline" else measured_ms

    def step_draft_ms(self, row_draft_ms: float) -> float:
        """A (batch) step's draft ms from one row's: paid once per row where the drafter proposes row by row."""
        return row_draft_ms * self.draft_rows

    def aggregate(self, row_tokens_per_s: float) -> float:
        """Every row's tokens/s together, from one row's (every row busy)."""
        return row_tokens_per_s * self.rows

    def describe(self) -> dict:
        if self.kind == "roofline":
            return {"kind": "roofline", "bandwidth_gb_s": self.bandwidth_gb_s, "target_forward_bytes": self.target_bytes}
        p = self.profile
        batch = {"batch_size": self.rows, "draft_paid_per_step": self.draft_rows} if self.rows > 1 else {}
        return {"kind": "profile", "context_tokens": p.context_tokens, "max_tokens": len(p.ms), "device_name": p.device_name,
                "verify_ms_1": p.ms[0], "verify_ms_max": p.ms[-1], **batch}


def draft_rows(drafter, rows: int) -> int:
    """How many times a step of `rows` rows pays one row's draft: once where the drafter (a class)
    batches its draft forwards across rows (overrides `propose_rows`), else once per row."""
    from specbench.engine.protocol import Drafter

    batched = drafter is not None and getattr(drafter, "propose_rows", None) is not Drafter.propose_rows
    return 1 if batched or rows == 1 else rows


def timed(steps: list[StepMeasure], draft_ms: float, model: LatencyModel) -> list[StepMeasure]:
    """The steps with predicted timings: draft ms (one row's, as the batch step pays it), verify ms of root + tree nodes."""
    out = []
    for s in steps:
        d = model.step_draft_ms(draft_ms)  # propose runs every step, found something or not
        v = model.verify_ms(s.tree_size + 1)
        out.append(StepMeasure(d, v, d + v, s.tree_size, s.tree_depth, s.accepted))
    return out
