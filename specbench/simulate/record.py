"""`specbench record`: the target's greedy outputs on a workload, through the one decode loop.

Plain decoding is the loop with an empty draft; the recorder is that plain
drafter asking for the target's hidden states, which the loop hands over on
every step. From them come the side file (--hidden) and the top-N log-probs
(--topk), through the target's own LM head: the very logits plain decoding
took its argmax of.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from specbench.drafters.base import PlainDecoding
from specbench.engine.loop import decode
from specbench.checks import check_count, check_fits, context_window
from specbench.errors import UserError
from specbench.simulate.log import LogHeader, LogTurn, TargetLog, VerifyProfile, write_log
from specbench.workloads import Prompt, check_prompts_fit, encode_turn, workload_hash


class Recorder(PlainDecoding):
    """Plain decoding that keeps the target's final hidden states of every position it verifies."""

    needs_hidden_states = True

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self.rows = [prompt_hidden]

    def on_verified(self, outcome) -> None:
        self.rows.append(outcome.hidden[:1])  # the root's row (an empty draft has no others)

    def hidden(self) -> torch.Tensor:
        return torch.cat(self.rows)  # [P + N - 1, H]: prompt + every output token but the last


def topk_logprobs(target, hidden: torch.Tensor, prompt_len: int, topk: int) -> tuple[list, list]:
    """Top-N log-probs of the distribution each output token was chosen from."""
    with torch.inference_mode():
        logits = target.lm_head(hidden[prompt_len - 1 :]).float()
        values, ids = torch.log_softmax(logits, dim=-1).topk(topk, dim=-1)
    return ids.tolist(), [[round(v, 5) for v in row] for row in values.tolist()]


def record(
    target,
    prompts: list[Prompt],
    workload: str,
    max_new_tokens: int,
    out: Path,
    topk: int | None = None,
    hidden: bool = False,
    profile: VerifyProfile | None = None,
    environment: dict | None = None,
    on_turn: Callable[[], None] = lambda: None,
    profile_tokens: int | None = None,
    profile_repeats: int = 3,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> TargetLog:
    """Record the target's outputs on `prompts` and write the log (and its side file) to `out`.

    With `profile_tokens`, the verify-latency profile (forwards of 1..profile_tokens tokens) is
    measured over the recorded turns' typical context and written with them. Nothing is written
    until everything is measured, and then atomically (write_log): a kill or an error, ctrl-C
    included, leaves a log already at `out` exactly as it was."""
    check_count(max_new_tokens, "--max-new-tokens")
    check_count(profile_tokens, "--profile-max-tokens")
    check_count(profile_repeats, "--profile-repeats")
    if topk is not None and not 1 <= topk <= target.vocab_size:
        raise UserError(f"--topk must be between 1 and the vocabulary size {target.vocab_size}")
    if target.tokenizer is None:
        raise UserError(f"target '{target.name}' has no tokenizer; text workloads need one")
    if not prompts:
        raise UserError("no prompts to record")
    out = Path(out)
    window = context_window(target.config)
    check_prompts_fit(prompts, target.tokenizer, window, max_new_tokens, target.name)
    recorder = Recorder(target)
    want_rows = hidden or topk is not None
    drafter = recorder if want_rows else PlainDecoding(target)
    decode(target, drafter, torch.tensor(encode_turn(target.tokenizer, prompts[0], 0, [])), min(max_new_tokens, 16))  # warm-up
    turns, hidden_rows = [], {}
    for prompt in prompts:
        answers: list[str] = []
        for turn in range(len(prompt.turns)):
            ids = encode_turn(target.tokenizer, prompt, turn, answers)
            check_fits(len(ids), max_new_tokens, window, f"prompt {prompt.id} turn {turn + 1}", target.name)
            result = decode(target, drafter, torch.tensor(ids), max_new_tokens)
            answers.append(target.tokenizer.decode(result.output_ids, skip_special_tokens=True))
            row = LogTurn(prompt.id, turn, prompt.category, ids, result.output_ids, round(result.wall_ms, 3), round(result.ttft_ms, 3))
            if want_rows:
                states = recorder.hidden()
                if topk is not None:
                    row.topk_ids, row.topk_logprobs = topk_logprobs(target, states, len(ids), topk)
                if hidden:
                    hidden_rows[row.key] = states.detach().cpu().contiguous()
            turns.append(row)
            on_turn()
    header = LogHeader(
        target=target.name,
        target_id=target.model_id,
        tokenizer=getattr(target.tokenizer, "name_or_path", None) or target.model_id,
        vocab_size=target.vocab_size,
        dtype=str(target.dtype).removeprefix("torch."),
        device=str(target.device),
        max_new_tokens=max_new_tokens,
        eos_token_ids=sorted(target.eos_token_ids),
        workload=workload,
        workload_hash=workload_hash(prompts),
        topk=topk,
        hidden_size=target.hidden_size if hidden else None,
        target_forward_bytes=target.forward_bytes(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=environment or {},
    )
    if profile_tokens:
        from specbench.simulate.profile import measure_profile

        on_stage("measuring the verify-latency profile")
        lengths = [len(t.prompt_ids) + len(t.output_ids) // 2 for t in turns]
        context = min(sum(lengths) // len(lengths), (window or 10**9) - profile_tokens)
        profile = measure_profile(target, turns[0].prompt_ids, max(1, context), profile_tokens, profile_repeats,
                                  (environment or {}).get("device_name", ""),
                                  ("the profile context", "--profile-max-tokens", "--profile-repeats"))
    write_log(out, header, turns, profile, hidden_rows if hidden else None)
    return TargetLog(out, header, turns, profile)
