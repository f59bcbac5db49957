"""Throughput predicted from a latency model: per step, draft ms + verify ms(tokens).

Two models:
- `profile`: the target's measured verify latency by tokens per forward (the
  log's profile or `--profile FILE`), and the drafter's draft ms per step
  measured by timing its proposals along the log (see replay.py).
- `roofline`: memory-bound decoding at `--bandwidth` GB/s: a forward costs the
  bytes of weights it reads / bandwidth, whatever its token count (n <= 128);
  the draft costs its bytes × sequential passes / bandwidth.
The model ignores acceptance/KV bookkeeping (a few % of a step online).
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

    @staticmethod
    def build(profile: VerifyProfile | None, bandwidth_gb_s: float | None, target_bytes: int | None) -> LatencyModel:
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

    def describe(self) -> dict:
        if self.kind == "roofline":
            return {"kind": "roofline", "bandwidth_gb_s": self.bandwidth_gb_s, "target_forward_bytes": self.target_bytes}
        p = self.profile
        return {"kind": "profile", "context_tokens": p.context_tokens, "max_tokens": len(p.ms), "device_name": p.device_name,
                "verify_ms_1": p.ms[0], "verify_ms_max": p.ms[-1]}


def timed(steps: list[StepMeasure], draft_ms: float, model: LatencyModel) -> list[StepMeasure]:
    """The steps with predicted timings: draft ms, verify ms of root + tree nodes."""
    out = []
    for s in steps:
        d = draft_ms  # propose runs every step, found something or not
        v = model.verify_ms(s.tree_size + 1)
        out.append(StepMeasure(d, v, d + v, s.tree_size, s.tree_depth, s.accepted))
    return out
