"""The Decoding-Speculative-Decoding (DSD) log format, its simulation and its counting.

DSD's precomputed log is a prompts JSONL ({"prompt": "..."} per line) and a
text file of `str(tensor)` dumps, `tensor([[id, id, ...]])`, one per prompt,
matched by order: the target's greedy continuation. `read_dsd` turns the pair
into a TargetLog (tokenising the prompts with the target's tokenizer), naming
the line of any mismatch, non-tensor line or out-of-vocabulary id.

`dsd_replay` is DSD's way of simulating, kept for comparison: every step the
draft regenerates its k tokens from scratch (a fresh `generate` over the whole
context, no KV reuse). Here it is counted correctly (to the log's end, the
same caps and EOS rule as the decode loop), so its τ equals the teacher-forced
one and only its cost differs.

`dsd_reported` reproduces the arithmetic of DSD's `analyze_output.py` on the
running totals its simulation writes, to show the miscount: the first
iteration of the first prompt is dropped and the last iteration counted twice
(and per prompt, each prompt's first iteration is dropped).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from specbench.errors import UserError
from specbench.files import jsonl_rows, read_text, write_lock
from specbench.records import StepMeasure
from specbench.simulate.log import LogHeader, LogTurn, TargetLog, read_log

_NUMBER = re.compile(r"-?\d+")


def parse_tensor_dumps(path: Path) -> list[tuple[int, list[int]]]:
    """(first line number, ids) of every `tensor([[...]])` dump in a DSD target log."""
    if not path.is_file():
        raise UserError(f"DSD target log {path} does not exist")
    dumps, current, start = [], None, 0
    for number, raw in enumerate(read_text(path, "DSD target log").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if current is None:
            if not line.startswith("tensor([["):
                raise UserError(f"{path}:{number}: not a tensor dump (expected a line starting 'tensor([[')")
            current, start, line = [], number, line[len("tensor([[") :]
        end = line.find("]]")
        body = line if end < 0 else line[:end]
        for item in body.split(","):
            item = item.strip()
            if not item:
                continue
            if not _NUMBER.fullmatch(item):
                raise UserError(f"{path}:{number}: '{item}' is not a token id")
            current.append(int(item))
        if end >= 0:
            rest = line[end + 2 :].strip()
            if not rest.startswith((")", ", device=")):
                raise UserError(f"{path}:{number}: unexpected text after the tensor: '{rest}'")
            dumps.append((start, current))
            current = None
    if current is not None:
        raise UserError(f"{path}:{start}: tensor dump never closed with ']])'")
    return dumps


def read_prompts(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise UserError(f"DSD prompts file {path} does not exist")
    prompts = []
    for number, row in jsonl_rows(read_text(path, "DSD prompts file").splitlines(), str(path)):
        if not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{number}: expected {{\"prompt\": \"...\"}}")
        prompts.append((number, row["prompt"]))
    return prompts


def read_dsd(log_path: Path, prompts_path: Path, tokenizer, vocab_size: int, target: str, eos_ids: list[int]) -> TargetLog:
    log_path, prompts_path = Path(log_path), Path(prompts_path)
    if tokenizer is None:
        raise UserError("a DSD log has text prompts: pass --target NAME (its tokenizer tokenises them)")
    dumps, prompts = parse_tensor_dumps(log_path), read_prompts(prompts_path)
    if len(dumps) != len(prompts):
        more = f"{log_path}:{dumps[len(prompts)][0]}: tensor {len(prompts) + 1} has no prompt" if len(dumps) > len(prompts) else \
            f"{prompts_path}:{prompts[len(dumps)][0]}: prompt {len(dumps) + 1} has no tensor"
        raise UserError(f"{more} ({len(dumps)} tensor dumps, {len(prompts)} prompts; they are matched by order)")
    turns = []
    for index, ((line, ids), (_, text)) in enumerate(zip(dumps, prompts), 1):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise UserError(f"{log_path}:{line}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
        if not ids:
            raise UserError(f"{log_path}:{line}: empty tensor")
        prompt_ids = list(tokenizer(text)["input_ids"])
        if not prompt_ids:
            raise UserError(f"{prompts_path}: prompt {index} encodes to no tokens; give it some text")
        turns.append(LogTurn(str(index), 0, "dsd", prompt_ids, ids))
    header = LogHeader(
        target=target, target_id=target, tokenizer=getattr(tokenizer, "name_or_path", target), vocab_size=vocab_size,
        dtype="unknown", device="unknown", max_new_tokens=max(len(t.output_ids) for t in turns),
        eos_token_ids=eos_ids, workload=str(prompts_path), workload_hash="", source=f"converted from DSD log {log_path.name}",
    )
    return TargetLog(log_path, header, turns)


@torch.inference_mode()
def dsd_replay(model, prompt: list[int], output: list[int], k: int, max_new_tokens: int) -> list[StepMeasure]:
    """DSD-style simulation of a draft model: each step regenerates k tokens from scratch
    (`generate` over the whole context, no KV reuse across steps), counted like the loop."""
    from specbench.engine.acceptance import accept_predicted
    from specbench.engine.tree import DraftTree

    device = next(model.parameters()).device
    sequence = torch.tensor(prompt + output, device=device)
    p, n_out, steps, m = len(prompt), len(output), [], 1
    while m < n_out:
        k_eff = min(k, max_new_tokens - m)
        context = sequence[: p + m][None]
        generated = model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=k_eff, min_new_tokens=k_eff,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
        tree = DraftTree.chain(generated[0, p + m :])
        predicted = [output[m]] + [output[m + d] if m + d < n_out else -1 for d in tree.depths]
        accepted = len(accept_predicted(tree, predicted).accepted_nodes)
        steps.append(StepMeasure(0.0, 0.0, 0.0, len(tree), tree.depth, accepted))
        m += accepted + 1
    return steps


def dsd_reported(totals: list[int]) -> tuple[list[float], float]:
    """What DSD's analyze_output.py prints for the running totals its simulation writes
    (one line per iteration, the count restarting per prompt): (per prompt, overall).
    Reimplemented from its arithmetic: entry i-1 holds the increment of iteration i,
    so each prompt's first increment is shifted out, a new prompt is detected by a
    drop in the total, and the final entry repeats the last increment."""
    n = len(totals)
    diffs = [0] * n
    per_prompt, start, last = [], 0, 0
    for i in range(1, n):
        last = totals[i] - totals[i - 1]
        if last < 0:
            segment = diffs[start : i - 1]
            per_prompt.append(sum(segment) / len(segment) if segment else float("nan"))
            start = i
        diffs[i - 1] = last if last > 0 else totals[i]
    segment = diffs[start:]  # taken before the final entry is filled in
    per_prompt.append(sum(segment) / len(segment) if segment else float("nan"))
    diffs[-1] = last if last > 0 else totals[-1]
    return per_prompt, sum(diffs) / n


def running_totals(per_prompt_steps: list[list[StepMeasure]]) -> list[int]:
    """DSD's log of a simulation: after each iteration, tokens matched so far in its prompt."""
    totals = []
    for steps in per_prompt_steps:
        total = 0
        for s in steps:
            total += s.accepted + 1
            totals.append(total)
    return totals


def open_log(log: Path, prompts: Path | None = None, target: str | None = None) -> TargetLog:
    """A specbench target log, or with `prompts` a Decoding-Speculative-Decoding log
    (tensor dumps matched by order to a prompts JSONL, tokenised by `target`'s tokenizer)."""
    if prompts is None:
        return read_log(log)
    from specbench.targets.loading import load_tokenizer

    if not target:
        raise UserError("a DSD log has text prompts: pass --target NAME (its tokenizer tokenises them)")
    tokenizer = load_tokenizer(target)
    if tokenizer is None:
        raise UserError(f"no tokenizer found for '{target}'; pass a target whose tokenizer is available locally")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return read_dsd(log, prompts, tokenizer, len(tokenizer), target, eos)


def convert_dsd_log(log: Path, prompts: Path, target: str, out: Path) -> TargetLog:
    """`specbench convert-log`: a DSD log (tensor dumps + prompts) written as a specbench target log."""
    from specbench.checks import check_output_file
    from specbench.simulate.log import write_log

    check_output_file(out, "--out", inputs=(log, prompts))
    with write_lock(out):  # the log (as record writes it): one writer at a time
        converted = open_log(log, prompts, target)
        write_log(out, converted.header, converted.turns)
    return converted
