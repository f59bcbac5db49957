"""`specbench record`: the target's greedy outputs on a workload, through the one decode loop.

Plain decoding is the loop with an empty draft; the recorder is that plain
drafter asking for the target's hidden states (its taps), which the loop hands
over on every step. From them come the side file (--hidden: the final states;
--hidden-taps: the inputs of chosen layers, e.g. the three EAGLE-3 fuses) and the
top-N log-probs (--topk), through the target's own LM head: the very logits plain
decoding took its argmax of.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from specbench.engine.loop import decode
from specbench.engine.protocol import PlainDecoding, Taps
from specbench.errors import UserError
from specbench.progress import SILENT, Progress
from specbench.simulate.log import (
    LogHeader,
    LogTurn,
    TargetLog,
    VerifyProfile,
    hidden_file_for,
    hidden_key,
    write_log,
)
from specbench.workloads import Prompt, encode_turn, workload_hash


class Recorder(PlainDecoding):
    """Plain decoding that keeps the target's hidden states (`taps`) of every position it verifies."""

    def __init__(self, target, taps: Taps = (None,)) -> None:
        super().__init__(target)
        self.taps = taps

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self.rows = [prompt_hidden]

    def on_verified(self, outcome) -> None:
        self.rows.append(outcome.hidden[:1])  # the root's row (an empty draft has no others)

    def hidden(self) -> torch.Tensor:
        return torch.cat(self.rows)  # [P + N - 1, H·len(taps)]: prompt + every output token but the last


def parse_hidden_taps(text: str | None, num_layers: int) -> tuple[int, ...]:
    """`--hidden-taps`: layer indices (the hidden state entering each), comma-separated, or
    `eagle3` for the three an EAGLE-3 draft fuses by default (2, L//2, L-3)."""
    layers: list[int] = []
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        if part == "eagle3":
            layers += [2, num_layers // 2, num_layers - 3]
            continue
        try:
            layers.append(int(part))
        except ValueError:
            raise UserError(f"--hidden-taps takes layer indices or 'eagle3', comma-separated (got '{part}')") from None
    bad = [j for j in layers if not 0 <= j < num_layers]
    if bad:
        raise UserError(f"--hidden-taps: layer {bad[0]} is outside the target's {num_layers} layers (0..{num_layers - 1})")
    return tuple(dict.fromkeys(layers))


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
    hidden_layers: tuple[int, ...] = (),
) -> Path:
    """`hidden`: keep the final hidden states in the side file; `hidden_layers`: also the
    hidden states entering these layers."""
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if topk is not None and not 1 <= topk <= target.vocab_size:
        raise UserError(f"--topk must be between 1 and the vocabulary size {target.vocab_size}")
    if target.tokenizer is None:
        raise UserError(f"target '{target.name}' has no tokenizer; text workloads need one")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keep_final = hidden or topk is not None  # the top-N log-probs come from the final states
    taps: Taps = ((None,) if keep_final else ()) + tuple(hidden_layers)
    saved = ((None,) if hidden else ()) + tuple(hidden_layers)  # what goes to the side file
    recorder = Recorder(target, taps)
    want_rows = bool(taps)
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
                parts = dict(zip(taps, recorder.hidden().split(target.hidden_size, dim=-1)))
                if topk is not None:
                    row.topk_ids, row.topk_logprobs = topk_logprobs(target, parts[None], len(ids), topk)
                for tap in saved:
                    hidden_rows[hidden_key(row.key, tap)] = parts[tap].detach().cpu().contiguous()
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
        hidden_size=target.hidden_size if saved else None,
        num_layers=target.num_layers,
        target_forward_bytes=target.forward_bytes(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=environment or {},
    )
    if saved:
        from safetensors.torch import save_file

        side = hidden_file_for(out)
        save_file(hidden_rows, str(side))
        header.hidden_file = side.name
        header.hidden_taps = list(saved)
    write_log(out, header, turns, profile)
    return out


def record_workload(
    target_name: str,
    workload: str,
    out: Path,
    limit: int | None = None,
    max_new_tokens: int = 128,
    topk: int | None = None,
    hidden: bool = False,
    profile: bool = True,
    profile_max_tokens: int = 128,
    profile_repeats: int = 3,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress = SILENT,
    hidden_taps: str | None = None,
) -> TargetLog:
    """`specbench record`: load the target, record its greedy outputs on the workload and, with
    `profile`, its verify-latency profile over a typical context, into one log. `hidden_taps`:
    layers whose input hidden states the side file also keeps (e.g. "eagle3", "2,16,29")."""
    from specbench.environment import environment
    from specbench.simulate.log import read_log
    from specbench.simulate.profile import measure_profile
    from specbench.targets.hf import HFTarget
    from specbench.targets.loading import resolve_device, resolve_dtype
    from specbench.workloads import load_workload

    prompts = load_workload(workload)[:limit] if limit else load_workload(workload)
    dev = resolve_device(device)
    with progress.status(f"loading {target_name}"):
        target = HFTarget.load(target_name, dev, resolve_dtype(dtype, dev))
    layers = parse_hidden_taps(hidden_taps, target.num_layers)
    env = environment(dev)
    advance = progress.task(f"recording {target_name}", sum(len(p.turns) for p in prompts))
    record(target, prompts, workload, max_new_tokens, out, topk, hidden, None, env, advance, layers)
    log = read_log(out)
    if profile:
        lengths = [len(t.prompt_ids) + len(t.output_ids) // 2 for t in log.turns]
        with progress.status("measuring the verify-latency profile"):
            log.profile = measure_profile(target, log.turns[0].prompt_ids, sum(lengths) // len(lengths), profile_max_tokens,
                                          profile_repeats, env["device_name"])
        write_log(out, log.header, log.turns, log.profile)
    return log
