"""`specbench record`: the target's greedy outputs on a workload, through the one decode loop.

Plain decoding is the loop with an empty draft; the recorder is that plain
drafter asking for the target's hidden states, which the loop hands over on
every step. From them come the side file (--hidden) and the top-N log-probs
(--topk), through the target's own LM head: the very logits plain decoding
took its argmax of.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from specbench.engine.loop import decode
from specbench.engine.options import option
from specbench.engine.protocol import FINAL, PlainDecoding
from specbench.errors import UserError
from specbench.progress import SILENT, Progress
from specbench.simulate.log import (
    LogHeader,
    LogTurn,
    TargetLog,
    VerifyProfile,
    hidden_file_for,
    write_log,
)
from specbench.targets.loading import DEVICE_HELP, DTYPE_HELP, TARGET_HELP
from specbench.workloads import Prompt, encode_turn, workload_hash


class Recorder(PlainDecoding):
    """Plain decoding that keeps the target's final hidden states of every position it verifies."""

    taps = FINAL

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
) -> Path:
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if topk is not None and not 1 <= topk <= target.vocab_size:
        raise UserError(f"--topk must be between 1 and the vocabulary size {target.vocab_size}")
    if target.tokenizer is None:
        raise UserError(f"target '{target.name}' has no tokenizer; text workloads need one")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(target)
    want_rows = hidden or topk is not None
    drafter = recorder if want_rows else PlainDecoding(target)
    decode(target, drafter, torch.tensor(encode_turn(target.tokenizer, prompts[0], 0, [])), min(max_new_tokens, 16))  # warm-up
    turns, hidden_rows = [], {}
    for prompt in prompts:
        answers: list[str] = []
        for turn in range(len(prompt.turns)):
            ids = encode_turn(target.tokenizer, prompt, turn, answers)
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
        num_layers=target.num_layers,
        target_forward_bytes=target.forward_bytes(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=environment or {},
    )
    if hidden:
        from safetensors.torch import save_file

        side = hidden_file_for(out)
        save_file(hidden_rows, str(side))
        header.hidden_file = side.name
    write_log(out, header, turns, profile)
    return out


@dataclass
class RecordConfig:
    """What `specbench record` records; each field's help is what `--help` shows."""

    target: str = option("smollm2-135m", TARGET_HELP)
    workload: str = option("builtin", "a name from `specbench workloads`, or a .jsonl file")
    limit: int | None = option(None, "use only the first N prompts", min=1)
    max_new_tokens: int = option(128, "new tokens per turn at most", min=1)
    topk: int | None = option(None, "also keep the target's top-N log-probs per position", min=1)
    hidden: bool = option(False, "also keep the target's final hidden states (safetensors side file) for head drafters")
    profile: bool = option(True, "also measure the verify-latency profile into the log")
    profile_max_tokens: int = option(128, "profile forwards of 1..N tokens", min=1)
    profile_repeats: int = option(3, "timed repeats per token count (median kept)", min=1)
    dtype: str = option("auto", DTYPE_HELP)
    device: str = option("auto", DEVICE_HELP)


def record_workload(config: RecordConfig, out: Path, progress: Progress = SILENT) -> TargetLog:
    """`specbench record`: load the target, record its greedy outputs on the workload and, with
    `profile`, its verify-latency profile over a typical context, into one log."""
    from specbench.environment import environment
    from specbench.simulate.log import read_log
    from specbench.simulate.profile import measure_profile
    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import resolve_device, resolve_dtype
    from specbench.workloads import load_workload

    c = config
    prompts = load_workload(c.workload)[: c.limit] if c.limit else load_workload(c.workload)
    dev = resolve_device(c.device)
    with progress.status(f"loading {c.target}"):
        target = HFTarget.load(c.target, dev, resolve_dtype(c.dtype, dev))
    env = environment(dev)
    advance = progress.task(f"recording {c.target}", sum(len(p.turns) for p in prompts))
    record(target, prompts, c.workload, c.max_new_tokens, out, c.topk, c.hidden, None, env, advance)
    log = read_log(out)
    if c.profile:
        lengths = [len(t.prompt_ids) + len(t.output_ids) // 2 for t in log.turns]
        with progress.status("measuring the verify-latency profile"):
            log.profile = measure_profile(target, log.turns[0].prompt_ids, sum(lengths) // len(lengths), c.profile_max_tokens,
                                          c.profile_repeats, env["device_name"])
        write_log(out, log.header, log.turns, log.profile)
    return log
