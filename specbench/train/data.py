"""`specbench train-data`: self-distillation data, the target's own answers to a prompt pool.

A data directory holds
- `meta.json`: the target, its tokenizer fingerprint and vocabulary size, the
  workload and the generation settings (training refuses data made by another
  target or tokenizer);
- `conversations.jsonl`: the prompts and the target's answers in ShareGPT
  layout (`{"id", "category", "conversations": [{"from": "human"|"gpt", "value"}]}`),
  so the same file can be fed back as a workload;
- `tokens.safetensors`: the tokenised sequences, concatenated: `ids` [N] int32,
  `offsets` [n+1] int64 (sequence i is ids[offsets[i]:offsets[i+1]]) and
  `starts` [n] int64 (where the target's answer begins; losses count only
  positions that predict answer tokens);
- optionally `hidden.safetensors`: `hidden` [N, H] (fp16), the frozen target's
  final (normed) hidden states over every sequence, kept from the generation
  itself, so head training never runs the target body again (its logits are
  one `lm_head` matmul away). The last row of each sequence is zeros: nothing
  follows it, so no loss ever reads it;
- optionally (`--hidden-taps`, e.g. `eagle3`) `taps.safetensors`: `taps` [N, k·H]
  (fp16), the hidden states ENTERING the listed target layers (HF's
  `hidden_states[j]`), concatenated in order, from the same generation, and
  meta's `taps` naming the layers. EAGLE-3 fuses three of them; caching them
  (212 MB for the 61k-token pool) costs less than one target forward per
  training batch, which would outweigh the draft's own step.

The directory is written as one unit under a write lock (a second train-data into it is
refused): every file carries the generation meta.json names (`generation` in each safetensors
header; `conversations_sha256` for the answers), meta.json is written last, files of an earlier
generation that this one does not write are removed, and `load_data` refuses a directory whose
parts belong to different generations (a kill between two saves), never training on the mix.

Answers are generated in batches with transformers `generate` (left padding),
greedy or sampled at `--temperature`; multi-turn prompts are answered turn by
turn, each later turn after the model's own earlier answers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specbench.checks import check_count, check_output_dir, check_temperature, context_window
from specbench.engine.options import CommandConfig, option
from specbench.engine.protocol import TrainableTarget
from specbench.errors import UserError
from specbench.files import WRITING, atomic_write, atomic_write_text, read_bytes, read_text, reading_weights, write_lock
from specbench.progress import SILENT, Progress
from specbench.targets.loading import DEVICE_HELP, DTYPE_HELP
from specbench.workloads import Prompt, check_prompts_fit, encode_turn, load_workload, select, workload_hash

META = "meta.json"
CONVERSATIONS = "conversations.jsonl"
TOKENS = "tokens.safetensors"
HIDDEN = "hidden.safetensors"
TAPS = "taps.safetensors"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token → id), so data from another tokenizer is recognised."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def check_out(out: Path, overwrite: bool, what: str = "data directory", inputs: tuple = ()) -> None:
    """Refuse, before any work, an --out that cannot be written, holds something (unless `overwrite`),
    or holds (or is) one of the command's `inputs` ((path, flag) pairs): writing it would destroy them."""
    check_output_dir(out, "--out")
    where = Path(out).resolve()
    for source, flag in inputs:
        if source is not None and Path(source).exists():
            real = Path(source).resolve()
            if real == where or where in real.parents:  # --out is the input or holds it (a folder inside an input harms nothing)
                raise UserError(f"--out {out} and {flag} {source} overlap; writing --out would change an input of this command: "
                                "choose another --out")
    if out.exists() and any(p for p in out.iterdir() if p.name not in (".lock", WRITING)) and not overwrite:
        raise UserError(f"{what} '{out}' exists and is not empty; choose another --out or pass --overwrite")


def prepare_out(out: Path, overwrite: bool, what: str = "data directory") -> None:
    """Create `out`, refusing to write into a non-empty directory unless `overwrite`."""
    check_out(out, overwrite, what)
    out.mkdir(parents=True, exist_ok=True)


def _generation_of(path: Path) -> str | None:
    """The generation a safetensors file of a data directory carries in its header (None: none)."""
    from safetensors import safe_open

    with reading_weights(path, "training data"), safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("generation")


@dataclass
class TrainData:
    """A loaded data directory."""

    directory: Path
    meta: dict
    ids: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [n+1]
    starts: torch.Tensor  # [n]
    hidden: torch.Tensor | None  # [N, H] or None
    taps: torch.Tensor | None = None  # [N, k·H]: the states entering the layers meta["taps"] names, or None

    def __len__(self) -> int:
        return len(self.starts)

    def sequence(self, i: int) -> tuple[torch.Tensor, int]:
        """(token ids of sequence i, index where its answer starts)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], int(self.starts[i]) - a

    def hidden_of(self, i: int) -> torch.Tensor | None:
        if self.hidden is None:
            return None
        return self.hidden[int(self.offsets[i]) : int(self.offsets[i + 1])]

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return tuple(self.meta.get("taps") or ())

    def taps_of(self, i: int, layers: tuple[int, ...]) -> torch.Tensor:
        """The cached states entering `layers` (in that order; a layer may repeat) over sequence i, [L, k·H]."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        width = self.taps.shape[1] // len(self.tap_layers)
        parts = [self.taps[a:b, self.tap_layers.index(j) * width : (self.tap_layers.index(j) + 1) * width] for j in layers]
        return torch.cat(parts, dim=-1)

    def require_taps(self, layers: tuple[int, ...], what: str) -> None:
        """Refuse data that does not cache the states entering every one of `layers`."""
        missing = [j for j in layers if j not in self.tap_layers] if self.taps is not None else list(layers)
        if missing:
            have = f"caches the states entering layers {list(self.tap_layers)}" if self.taps is not None else "caches no layer taps"
            flag = "eagle3" if what == "eagle3" else ",".join(map(str, dict.fromkeys(layers)))
            raise UserError(f"data '{self.directory}' {have}; {what} reads the states entering layers {list(layers)}: "
                            f"regenerate it with `specbench train-data --hidden-taps {flag}`")

    def check_target(self, target) -> None:
        """Refuse data generated by another target or tokenizer."""
        if self.meta["vocab_size"] != target.vocab_size:
            raise UserError(
                f"data '{self.directory}' was made by '{self.meta['target']}' ({self.meta['vocab_size']} token ids); "
                f"target '{target.name}' has {target.vocab_size}: regenerate it with `specbench train-data --target {target.name}`"
            )
        if target.tokenizer is not None and self.meta.get("tokenizer") != tokenizer_fingerprint(target.tokenizer):
            raise UserError(
                f"data '{self.directory}' was tokenised by '{self.meta['target']}', whose tokenizer differs from "
                f"'{target.name}''s; regenerate it with `specbench train-data --target {target.name}`"
            )
        if self.hidden is not None and self.hidden.shape[1] != target.hidden_size:
            raise UserError(
                f"data '{self.directory}' caches hidden states of width {self.hidden.shape[1]}, target '{target.name}' "
                f"has {target.hidden_size}: it was made by another model; regenerate it"
            )
        if self.taps is not None and self.taps.shape[1] != len(self.tap_layers) * target.hidden_size:
            raise UserError(
                f"data '{self.directory}' caches layer taps of width {self.taps.shape[1]}, not {len(self.tap_layers)} x "
                f"{target.hidden_size} for target '{target.name}': it was made by another model; regenerate it"
            )
        if (self.hidden is not None or self.taps is not None) and self.meta.get("model_id") != target.model_id:
            raise UserError(
                f"data '{self.directory}' caches hidden states of '{self.meta.get('model_id')}', not of '{target.model_id}'; "
                "regenerate it for this target (or with --no-cache-hidden)"
            )


def data_dirs(spec: str) -> list[Path]:
    """The directories a --data value names: one, or several separated by commas."""
    return [Path(part.strip()) for part in str(spec).split(",") if part.strip()]


def load_data_dirs(spec: str, target, with_hidden: bool = True, with_taps: bool = False) -> TrainData:
    """Load every directory `spec` names (comma-separated), each checked against `target`, and
    join them into one: their sequences end to end. A cache that not every part holds (hidden
    states, the same layer taps) is left out of the join, and whatever needs it refuses by name."""
    parts = [load_data(d, with_hidden, with_taps) for d in data_dirs(spec)]
    if not parts:
        raise UserError(f"'{spec}' names no data directory: give one from `specbench train-data`, or several separated by commas")
    for part in parts:
        part.check_target(target)
    if len(parts) == 1:
        return parts[0]
    shifts = [0, *itertools.accumulate(int(p.offsets[-1]) for p in parts[:-1])]  # where each part's tokens begin in the join
    offsets = torch.cat([parts[0].offsets[:1], *[p.offsets[1:] + shift for p, shift in zip(parts, shifts)]])
    starts = torch.cat([p.starts + shift for p, shift in zip(parts, shifts)])
    hidden = torch.cat([p.hidden for p in parts]) if all(p.hidden is not None for p in parts) else None
    same_taps = all(p.taps is not None and p.tap_layers == parts[0].tap_layers for p in parts)
    taps = torch.cat([p.taps for p in parts]) if same_taps else None
    meta = dict(parts[0].meta)
    for key in ("prompts", "sequences", "tokens", "answer_tokens"):
        meta[key] = sum(int(p.meta.get(key) or 0) for p in parts)
    meta["taps"] = parts[0].meta.get("taps") if same_taps else None
    meta["parts"] = [{"directory": str(p.directory), "workload": p.meta.get("workload"), "sequences": len(p),
                      "answer_tokens": p.meta.get("answer_tokens"), "generation": p.meta.get("generation")} for p in parts]
    return TrainData(Path(spec), meta, torch.cat([p.ids for p in parts]), offsets, starts, hidden, taps)


def load_data(directory: Path, with_hidden: bool = True, with_taps: bool = False) -> TrainData:
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / META).exists() and any((directory / name).exists() for name in (CONVERSATIONS, TOKENS, HIDDEN, TAPS)):
        # meta.json goes first and comes back last (make_data): parts without it are a write that never finished
        raise UserError(f"data '{directory}' is half written (parts without {META}: a train-data interrupted or failed before it "
                        "finished); regenerate it with `specbench train-data --overwrite`")
    if not (directory / META).exists() or not (directory / TOKENS).exists():
        raise UserError(f"'{directory}' is not a training data directory (no {META}/{TOKENS}); make one with `specbench train-data`")
    try:
        meta = json.loads(read_text(directory / META, "training data meta"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{directory / META} is not valid JSON ({exc.msg}); regenerate the data with `specbench train-data`") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise UserError(f"{directory / META} is not a training data description; regenerate the data with `specbench train-data`")
    regenerate = "regenerate it with `specbench train-data --overwrite`"
    generation = meta.get("generation")
    # the files meta.json says this generation wrote (another one present is stale: never read); one missing
    # is read as not cached, which whatever needs it refuses by name
    named = [(TOKENS, True), (HIDDEN, (not generation or bool(meta.get("hidden"))) and (directory / HIDDEN).exists()),
             (TAPS, (not generation or bool(meta.get("taps"))) and (directory / TAPS).exists())]
    wanted = {TOKENS: True, HIDDEN: with_hidden, TAPS: with_taps}
    for name, present in named:
        if generation and present and wanted[name] and _generation_of(directory / name) != generation:
            raise UserError(f"data '{directory}': {name} belongs to another generation than {META} (an interrupted or "
                            f"concurrent write mixed two); {regenerate}")
    if generation and meta.get("conversations_sha256") and (directory / CONVERSATIONS).is_file():
        if hashlib.sha256(read_bytes(directory / CONVERSATIONS, "training conversations")).hexdigest() != meta["conversations_sha256"]:
            raise UserError(f"data '{directory}': {CONVERSATIONS} is not the one {META} was written with; {regenerate}")
    with reading_weights(directory / TOKENS, "training tokens"):
        tokens = load_file(directory / TOKENS)
    if not {"ids", "offsets", "starts"} <= set(tokens):
        raise UserError(f"{directory / TOKENS} lacks ids/offsets/starts; regenerate the data with `specbench train-data`")
    if len(tokens["starts"]) == 0:
        raise UserError(f"data '{directory}' holds no sequences; regenerate it with a non-empty workload")
    rows = tokens["ids"].numel()
    hidden = None
    if with_hidden and named[1][1]:
        with reading_weights(directory / HIDDEN, "cached hidden states"):
            hidden = load_file(directory / HIDDEN)["hidden"]
    taps = None
    if with_taps and named[2][1]:
        with reading_weights(directory / TAPS, "cached layer taps"):
            taps = load_file(directory / TAPS)["taps"]
    for name, cached in ((HIDDEN, hidden), (TAPS, taps)):
        if cached is not None and cached.shape[0] != rows:
            raise UserError(f"data '{directory}': {name} holds {cached.shape[0]} rows for {rows} tokens (left from other data); {regenerate}")
    return TrainData(directory, meta, tokens["ids"].long(), tokens["offsets"], tokens["starts"], hidden, taps)


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.inference_mode()
def generate_answers(
    target: TrainableTarget,
    prompts: list[Prompt],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    hidden_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
    tap_layers: tuple[int, ...] = (),
) -> list[list[tuple[list[int], list[int], torch.Tensor | None, torch.Tensor | None]]]:
    """For every prompt, per turn: (prompt ids, answer ids incl. EOS if produced, hidden, taps).

    `hidden` (when `hidden_dtype` is given) holds the target's final normed hidden
    state at every position of prompt + answer, taken from the generation itself
    (no second pass); the last position's row is zeros, since its state is never
    computed (its token is the last one generated) and nothing follows it to predict.
    `taps` (when `tap_layers` are given, in `hidden_dtype`) holds the states entering
    those layers, concatenated, with the same zero last row."""
    tokenizer, model = target.tokenizer, target.model
    eos = sorted(target.eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    torch.manual_seed(seed)
    results: list[list] = [[] for _ in prompts]
    answers_text: list[list[str]] = [[] for _ in prompts]
    want_hidden = hidden_dtype is not None
    if tap_layers and not want_hidden:
        raise ValueError("layer taps are cached in hidden_dtype: give one")
    for turn in range(max(len(p.turns) for p in prompts)):
        todo = [i for i, p in enumerate(prompts) if len(p.turns) > turn]
        encoded = {i: encode_turn(tokenizer, prompts[i], turn, answers_text[i]) for i in todo}
        todo.sort(key=lambda i: len(encoded[i]))  # similar lengths together: less padding
        for batch in _batches(todo, batch_size):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every answer starts at column `width`
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
            out = model.generate(
                input_ids=ids.to(target.device),
                attention_mask=mask.to(target.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                output_hidden_states=want_hidden,
                return_dict_in_generate=True,
                **kwargs,
            )
            if want_hidden:  # [B, width + steps, H]: prefill states, then one per generated step
                states = torch.cat([out.hidden_states[0][-1], *[s[-1] for s in out.hidden_states[1:]]], dim=1)
                states = states.to("cpu", hidden_dtype)
            if tap_layers:  # [B, width + steps, k·H]: hidden_states[j] is the input of layer j
                tapped = torch.cat([torch.cat([s[j] for j in tap_layers], dim=-1) for s in out.hidden_states], dim=1)
                tapped = tapped.to("cpu", hidden_dtype)
            for row, i in enumerate(batch):
                answer = out.sequences[row, width:].tolist()
                for n, token in enumerate(answer):
                    if token in target.eos_token_ids:
                        answer = answer[: n + 1]
                        break
                hidden = taps = None
                length = len(encoded[i]) + len(answer)
                if want_hidden:
                    hidden = torch.zeros((length, states.shape[-1]), dtype=hidden_dtype)
                    hidden[: length - 1] = states[row, width - len(encoded[i]) : width + len(answer) - 1]
                if tap_layers:
                    taps = torch.zeros((length, tapped.shape[-1]), dtype=hidden_dtype)
                    taps[: length - 1] = tapped[row, width - len(encoded[i]) : width + len(answer) - 1]
                results[i].append((encoded[i], answer, hidden, taps))
                answers_text[i].append(tokenizer.decode(answer, skip_special_tokens=True).strip())
            if on_batch:
                on_batch(len(batch))
    return results


@dataclass
class DataConfig(CommandConfig):
    """What `specbench train-data` generates; each field's help is what `--help` shows."""

    target: str = option("smollm2-135m", "the target whose own answers become the training data")
    workload: str = option("pool-train", "prompts: pool-train (built-in, offline), a .jsonl workload or a ShareGPT-layout .json/.jsonl")
    max_new_tokens: int = option(256, "answer length cap per turn", min=1)
    temperature: float = option(0.0, "0 = greedy answers; > 0 = sampled", min=0)
    batch_size: int = option(16, "prompts generated together", min=1)
    limit: int | None = option(None, "use only the first N prompts", min=1)
    cache_hidden: bool = option(True, "also store the target's final hidden states (fp16), so head training skips the target body")
    hidden_taps: str | None = option(None, "also store the hidden states entering these target layers (fp16), comma-separated; "
                                           "'eagle3' = 2, L//2, L-3, what `train --drafter eagle3` reads")
    seed: int = option(0, "seed for sampling", min=0, max=2**63 - 1)
    dtype: str = option("auto", DTYPE_HELP)
    device: str = option("auto", DEVICE_HELP)


def make_data_for(config: DataConfig, out: Path, overwrite: bool = False, progress: Progress = SILENT, command: str = "") -> dict:
    """`specbench train-data`: load the target, then `make_data` with progress shown per stage."""
    from specbench.targets import load_target

    c = config  # its counts were checked when it was made (CommandConfig)
    check_output_dir(out, "--out")  # a path that cannot be a directory is refused before a lock file is made beside it
    check_temperature(c.temperature)  # before the target loads
    with write_lock(out):  # first: a directory another train-data is filling is refused as such, not as "not empty"
        check_out(out, overwrite, inputs=((c.workload, "--workload"),))
        target: TrainableTarget = load_target(c.target, c.device, c.dtype, "eager", progress=progress)  # generate_answers reads target.model
        return _make_data(target, c, out, overwrite, command, progress)


def _make_data(target, c: DataConfig, out: Path, overwrite: bool, command: str, progress: Progress) -> dict:
    stages: dict[str, Callable] = {}
    done: dict[str, int] = {}

    def on_progress(stage: str, count: int, total: int) -> None:
        if stage not in stages:
            stages[stage], done[stage] = progress.task(stage, total), 0
        stages[stage](count - done[stage])
        done[stage] = count

    return make_data(target, c.workload, out, max_new_tokens=c.max_new_tokens, temperature=c.temperature, batch_size=c.batch_size,
                     seed=c.seed, limit=c.limit, cache_hidden=c.cache_hidden, overwrite=overwrite, command=command, on_progress=on_progress,
                     hidden_taps=c.hidden_taps, locked=True)


def make_data(
    target: TrainableTarget,
    workload: str,
    out: Path,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    limit: int | None = None,
    cache_hidden: bool = True,
    hidden_dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    command: str = "",
    on_progress: Callable[[str, int, int], None] | None = None,
    hidden_taps: str | None = None,
    locked: bool = False,
) -> dict:
    """Generate, tokenise and save under the directory's write lock (`locked`: the caller holds
    it); returns the meta written to meta.json."""
    if not locked:
        with write_lock(out):
            return make_data(target, workload, out, max_new_tokens, temperature, batch_size, seed, limit, cache_hidden, hidden_dtype,
                             overwrite, command, on_progress, hidden_taps, locked=True)
    from specbench.simulate.record import parse_hidden_taps

    if target.tokenizer is None:
        raise UserError(f"target '{target.name}' has no tokenizer; train-data needs one to apply the chat template")
    check_count(max_new_tokens, "--max-new-tokens")
    check_count(batch_size, "--batch-size")
    check_temperature(temperature)
    tap_layers = parse_hidden_taps(hidden_taps, target.num_layers) if hidden_taps else ()
    prompts = select(load_workload(workload), limit=limit)
    check_prompts_fit(prompts, target.tokenizer, context_window(target.config), max_new_tokens, target.name)
    if not prompts:
        raise UserError(f"workload '{workload}' has no prompts to answer (is --limit 0?)")
    check_out(out, overwrite, inputs=((workload, "--workload"),))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _generate(target, prompts, workload, out, max_new_tokens, temperature, batch_size, seed, cache_hidden, hidden_dtype,
                         command, on_progress, tap_layers)
    except BaseException:
        if created:  # a directory this call made holds nothing worth keeping: no half-written data left behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _generate(target, prompts, workload, out, max_new_tokens, temperature, batch_size, seed, cache_hidden, hidden_dtype, command,
              on_progress, tap_layers) -> dict:
    from safetensors.torch import save_file

    generation = uuid.uuid4().hex[:16]
    begun = time.time()
    total = sum(len(p.turns) for p in prompts)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress("generate", done, total)

    results = generate_answers(
        target, prompts, max_new_tokens, temperature, batch_size, seed, hidden_dtype if (cache_hidden or tap_layers) else None, advance,
        tap_layers,
    )
    tok = target.tokenizer
    sequences, starts_local, hiddens, tapped, rows = [], [], [], [], []
    for prompt, turns in zip(prompts, results):
        conversation = []
        for text, (prompt_ids, answer, hidden, taps) in zip(prompt.turns, turns):
            conversation += [
                {"from": "human", "value": text},
                {"from": "gpt", "value": tok.decode(answer, skip_special_tokens=True).strip()},
            ]
            if answer:
                sequences.append(prompt_ids + answer)
                starts_local.append(len(prompt_ids))
                hiddens.append(hidden)
                tapped.append(taps)
        rows.append(json.dumps({"id": prompt.id, "category": prompt.category, "conversations": conversation}, ensure_ascii=False) + "\n")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.int32)
    starts = offsets[:-1] + torch.tensor(starts_local, dtype=torch.long)
    conversations = "".join(rows)
    tag = {"generation": generation}
    # meta.json goes first and last: a kill in between leaves no meta (not data), never an old meta over new parts
    (out / META).unlink(missing_ok=True)
    atomic_write_text(out / CONVERSATIONS, conversations)
    atomic_write(out / TOKENS, lambda tmp: save_file({"ids": ids, "offsets": offsets, "starts": starts}, str(tmp), metadata=tag))
    if cache_hidden:
        atomic_write(out / HIDDEN, lambda tmp: save_file({"hidden": torch.cat(hiddens).contiguous()}, str(tmp), metadata=tag))
    if tap_layers:
        atomic_write(out / TAPS, lambda tmp: save_file({"taps": torch.cat(tapped).contiguous()}, str(tmp), metadata=tag))
    answer_tokens = int(sum(len(s) - st for s, st in zip(sequences, starts_local)))
    meta = {
        "target": target.name,
        "model_id": target.model_id,
        "vocab_size": target.vocab_size,
        "hidden_size": target.hidden_size,
        "tokenizer": tokenizer_fingerprint(tok),
        "workload": workload,
        "workload_hash": workload_hash(prompts),
        "prompts": len(prompts),
        "sequences": len(sequences),
        "tokens": int(ids.numel()),
        "answer_tokens": answer_tokens,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "hidden": str(hidden_dtype).removeprefix("torch.") if cache_hidden else None,
        "taps": list(tap_layers) or None,  # taps.safetensors: the states entering these layers
        "dtype": str(target.dtype).removeprefix("torch."),
        "seconds": round(time.time() - begun, 1),
        "command": command,
        "generation": generation,  # every file below carries it (safetensors headers) or is hashed
        "conversations_sha256": hashlib.sha256(conversations.encode("utf-8")).hexdigest(),
    }
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")
    for name, written in ((HIDDEN, cache_hidden), (TAPS, bool(tap_layers))):
        if not written:  # an earlier generation's: never read beside this one's tokens
            (out / name).unlink(missing_ok=True)
    return meta
