"""`specbench record`: the target's greedy outputs on a workload, through the one decode loop.

Plain decoding is the loop with an empty draft; the recorder is that plain
drafter asking for the target's hidden states, which the loop hands over on
every step. From them come the side file (--hidden) and the top-N log-probs
(--topk), through the target's own LM head: the very logits plain decoding
took its argmax of.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from specbench.checks import check_count, check_fits
from specbench.engine.loop import WARMUP_TOKENS, decode
from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import PlainDecoding, Taps
from specbench.errors import UserError
from specbench.files import write_lock
from specbench.progress import SILENT, Progress
from specbench.simulate.log import LogHeader, LogTurn, TargetLog, VerifyProfile, hidden_key, write_log
from specbench.targets.loading import DEVICE_HELP, DTYPE_HELP, TARGET_HELP
from specbench.workloads import Prompt, check_prompts_fit, encode_turn, workload_hash


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
    `eagle3` for the three an EAGLE-3 draft fuses by default (2, L//2, L-3), or `dflash` for
    the five a DFlash draft reads by z-lab's tap rule (the outputs of layers k = the inputs of k + 1)."""
    layers: list[int] = []
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        if part == "eagle3":
            layers += [2, num_layers // 2, num_layers - 3]
            continue
        if part == "dflash":  # the outputs of the layers z-lab's tap rule picks (the inputs of the next ones)
            from specbench.drafters.dflash.layouts import tap_rule

            layers += [k + 1 for k in tap_rule(num_layers)]
            continue
        try:
            layers.append(int(part))
        except ValueError:
            raise UserError(f"--hidden-taps takes layer indices, 'eagle3' or 'dflash', comma-separated (got '{part}')") from None
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
    profile_tokens: int | None = None,
    profile_repeats: int = 3,
    on_stage: Callable[[str], None] = lambda stage: None,
    hidden_layers: tuple[int, ...] = (),
    locked: bool = False,
) -> TargetLog:
    """Record the target's outputs on `prompts` and write the log (and its side file) to `out`.

    With `profile_tokens`, the verify-latency profile (forwards of 1..profile_tokens tokens) is
    measured over the recorded turns' typical context and written with them. `hidden`: keep the
    final hidden states in the side file; `hidden_layers`: also the states entering these layers
    (EAGLE-3's taps). Nothing is written
    until everything is measured, and then atomically (write_log): a kill or an error, ctrl-C
    included, leaves a log already at `out` exactly as it was. Written under `out`'s write lock
    (`locked`: the caller holds it)."""
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
    with nullcontext() if locked else write_lock(out):  # the log and its side file are one unit: a second recorder is refused
        return _record(target, prompts, workload, max_new_tokens, out, topk, hidden, profile, environment, on_turn, profile_tokens,
                       profile_repeats, on_stage, hidden_layers)


def _record(target, prompts, workload, max_new_tokens, out, topk, hidden, profile, environment, on_turn, profile_tokens,
            profile_repeats, on_stage, hidden_layers) -> TargetLog:
    window = target.context_window()
    check_prompts_fit(prompts, target.tokenizer, window, max_new_tokens, target.name)
    keep_final = hidden or topk is not None  # the top-N log-probs come from the final states
    taps: Taps = ((None,) if keep_final else ()) + tuple(hidden_layers)
    saved = ((None,) if hidden else ()) + tuple(hidden_layers)  # what goes to the side file
    recorder = Recorder(target, taps)
    want_rows = bool(taps)
    drafter = recorder if want_rows else PlainDecoding(target)
    decode(target, drafter, torch.tensor(encode_turn(target.tokenizer, prompts[0], 0, [])), min(max_new_tokens, WARMUP_TOKENS))  # warm-up
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
        hidden_taps=list(saved) if saved else None,
        num_layers=target.num_layers,
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
    write_log(out, header, turns, profile, hidden_rows if saved else None)
    return TargetLog(out, header, turns, profile)


@dataclass
class RecordConfig(CommandConfig):
    """What `specbench record` records; each field's help is what `--help` shows."""

    target: str = option("smollm2-135m", TARGET_HELP)
    workload: str = option("builtin", "a name from `specbench workloads`, or a .jsonl file")
    limit: int | None = option(None, "use only the first N prompts", min=1)
    max_new_tokens: int = option(128, "new tokens per turn at most", min=1)
    topk: int | None = option(None, "also keep the target's top-N log-probs per position", min=1)
    hidden: bool = option(False, "also keep the target's final hidden states (safetensors side file) for head drafters and eagle")
    hidden_taps: str | None = option(None, "also keep the hidden states entering these layers, comma-separated; 'eagle3' = the three "
                                           "EAGLE-3 fuses (2, L//2, L-3); 'dflash' = the five z-lab's DFlash drafts read")
    profile: bool = option(True, "also measure the verify-latency profile into the log")
    profile_max_tokens: int = option(128, "profile forwards of 1..N tokens", min=1)
    profile_repeats: int = option(3, "timed repeats per token count (median kept)", min=1)
    dtype: str = option("auto", DTYPE_HELP)
    device: str = option("auto", DEVICE_HELP)


def record_workload(config: RecordConfig, out: Path, progress: Progress = SILENT) -> TargetLog:
    """`specbench record`: load the target, record its greedy outputs on the workload and, with
    `profile`, its verify-latency profile over a typical context, into one log written once complete."""
    from specbench.checks import check_output_file
    from specbench.environment import environment
    from specbench.targets import load_target
    from specbench.workloads import open_workload, select

    c = config  # its counts were checked when it was made (CommandConfig)
    check_output_file(out, "--out", inputs=(c.workload,))
    lock = write_lock(out)  # before the target loads: a second recorder into `out` is refused at once
    try:
        prompts = select(open_workload(c.workload).prompts, limit=c.limit)
        target = load_target(c.target, c.device, c.dtype, "eager", progress=progress)
        layers = parse_hidden_taps(c.hidden_taps, target.num_layers)
        advance = progress.task(f"recording {c.target}", sum(len(p.turns) for p in prompts))
        return record(target, prompts, c.workload, c.max_new_tokens, out, c.topk, c.hidden, None, environment(target.device), advance,
                      profile_tokens=c.profile_max_tokens if c.profile else None, profile_repeats=c.profile_repeats,
                      on_stage=lambda stage: advance(0, stage=stage), hidden_layers=layers, locked=True)
    except KeyboardInterrupt:
        kept = f"{out} is as it was" if Path(out).exists() else "nothing was written"
        raise UserError(f"interrupted; {kept} (a log is written only once complete)") from None
    finally:
        lock.release()
