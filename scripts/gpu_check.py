"""Every GPU-only check of specbench in one command: one table, the same as JSON.

    python scripts/gpu_check.py                  # CUDA: random-weight Vicuna-7B shape, fp16 (under 8 minutes on one H100)
    python scripts/gpu_check.py --device cpu     # smoke: a tiny shape in fp32, every path, no graphs (minutes on 2 cores)

Engines (eager, fast) × drafters (plain decoding and every drafter in DRAFTERS, built
with fresh or random weights: timing does not depend on weight values), each decoding
the same prompts to a forced length (EOS ignored) after the warm-up `specbench run`
does (engine/loop.py `warm_up`: caches sized, every bucket captured, one short untimed
decode), timed by the decode loop's own step records: tokens/s, draft and verify ms per
step, τ, the engine events inside timed decodes counted as run.json counts them
(records.py `EngineFacts`), speculative == plain and fast == eager counts with the
near-tie classification of the first differing token (engine/divergence.py `compare_decodes`). Then the bandwidth
fraction of plain decoding on the fast engine, the verify latency t(n), the fast
engine's capture time, and DeepSpeed TP = 1 against hf on the fast engine.
docs/gpu.md says how to install, what to carry to a machine without internet and
how to read the table.

Exit status 1 when a cell or section crashed (its one-line message is in its place,
the other checks still ran) or a CUDA graph capture failed; 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specbench.drafters.dflash.layouts import tap_rule, write_v1
from specbench.drafters.dflash.model import DFlashConfig, DFlashNet
from specbench.drafters.draft_model import DraftModelDrafter
from specbench.drafters.eagle.layouts import EAGLE1, EAGLE3, write_checkpoint
from specbench.drafters.eagle.model import EagleConfig, EagleNet
from specbench.drafters.registry import drafter_class
from specbench.engine.divergence import compare_decodes, rounding_eps
from specbench.engine.loop import Decoded, Request, decode, decode_rows, warm_up, warm_up_rows
from specbench.engine.protocol import Drafter, PlainDecoding, Target
from specbench.engine.speed import copy_bandwidth, verify_profile
from specbench.engine.events import counted
from specbench.environment import environment
from specbench.errors import SpecbenchWarning, UserError
from specbench.metrics import tau
from specbench.records import DIVERGENCE, NEAR_TIE, EngineFacts
from specbench.targets.batched import RowsHFTarget
from specbench.targets.fast import FastHFTarget
from specbench.targets.hf import HFTarget
from specbench.targets.loading import DTYPES, resolve_device
from specbench.targets.synthetic import random_model

# --- what runs -------------------------------------------------------------------------

PLAIN = "plain"
TREE = "mc_sim_7b_63"  # Medusa's published 63-node tree (depth 4)
DRAFT_SHAPE = {"vicuna-7b": "vicuna-draft", "tiny": "tiny-draft"}  # a random draft of the target's vocabulary
ENGINES = ("eager", "fast")
SPEEDS = (1, 2, 4, 8, 16, 32, 64, 128)  # the t(n) shown in the table (the JSON keeps every n measured)
DS_TARGET_RATIO = 0.90  # issue 15: DeepSpeed TP = 1 within 10 % of the hf fast path
DFLASH_BLOCK, DFLASH_LAYERS = 16, 5  # every published DFlash draft: blocks of 16, five layers


@dataclass
class Setup:
    """What every check shares: device, dtype, the random target model and the prompts."""

    device: torch.device
    dtype: torch.dtype
    shape: str
    prompts: list[torch.Tensor]
    new_tokens: int
    model: torch.nn.Module
    _draft: torch.nn.Module | None = None
    _eagles: dict[int, Path] = field(default_factory=dict)
    _dflash: Path | None = None
    _folder: tempfile.TemporaryDirectory | None = None

    def folder(self) -> Path:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="gpu_check_drafts_")
        return Path(self._folder.name)

    def draft_model(self) -> torch.nn.Module:
        """One random small draft, shared by both engines (its weights are only read)."""
        if self._draft is None:
            self._draft = random_model(DRAFT_SHAPE[self.shape], self.device, self.dtype, seed=1)
        return self._draft

    def eagle_checkpoint(self, version: int) -> Path:
        """A random one-layer EAGLE-`version` draft of the target's shape, written once in its
        published layout, so both engines load it as a user's checkpoint is loaded."""
        if version not in self._eagles:
            self._eagles[version] = write_random_eagle(self.folder() / f"eagle{version}", self.model, version, self.dtype)
        return self._eagles[version]

    def dflash_checkpoint(self) -> Path:
        """A random DFlash v1 draft of the target's shape (five layers, blocks of 16, taps by the
        tap rule), written once in z-lab's v1 layout, so both engines load it as a user's is loaded."""
        if self._dflash is None:
            self._dflash = write_random_dflash(self.folder() / "dflash", self.model, self.dtype)
        return self._dflash


def write_random_eagle(directory: Path, model: torch.nn.Module, version: int, dtype: torch.dtype) -> Path:
    """EAGLE-1 (the target's embeddings and LM head, none of its own) or EAGLE-3 (its own head over
    a draft vocabulary of a quarter of the target's, a random subset mapped through d2t/t2d, as the
    published EAGLE-3 drafts have), with PyTorch's random init."""
    c = model.config
    vocab, layers = c.vocab_size, c.num_hidden_layers
    config = EagleConfig(version=version, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                         head_dim=c.hidden_size // c.num_attention_heads, vocab_size=vocab,
                         draft_vocab_size=vocab if version == 1 else vocab // 4, target_hidden_size=c.hidden_size,
                         rms_norm_eps=c.rms_norm_eps, rope_theta=float(getattr(c, "rope_theta", None) or 10000.0))
    generator = torch.Generator().manual_seed(version)
    net = EagleNet(config, embedding=torch.nn.Embedding(1, 1))  # a stand-in: the target's table is not written
    if version == 3:
        ids = torch.randperm(vocab, generator=generator)[: config.draft_vocab_size].sort().values
        net.d2t.copy_(ids - torch.arange(config.draft_vocab_size))
        net.t2d.zero_()
        net.t2d[ids] = True
    # the reference's tap rule (2, L//2, L-3) needs 6 layers; a smaller shape taps its last three
    taps = None if version == 1 or layers >= 6 else (layers - 3, layers - 2, layers - 1)
    return write_checkpoint(directory, net.to(dtype), EAGLE3 if version == 3 else EAGLE1, taps=taps)


def write_random_dflash(directory: Path, model: torch.nn.Module, dtype: torch.dtype) -> Path:
    """z-lab's DFlash v1 draft for this target: the target's geometry (as z-lab's drafts copy
    their target's), DFLASH_LAYERS layers, blocks of DFLASH_BLOCK, five taps by the tap rule, the
    mask the target's last row (random prompts never hold it); PyTorch's random init, built on
    the target's device (a 7B-wide draft is 1.1 B parameters)."""
    c = model.config
    heads = c.num_attention_heads
    config = DFlashConfig(layout="dflash", hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_heads=heads,
                          num_kv_heads=c.num_key_value_heads, head_dim=c.hidden_size // heads, num_layers=DFLASH_LAYERS,
                          block_size=DFLASH_BLOCK, mask_token_id=c.vocab_size - 1,
                          target_layer_ids=tuple(tap_rule(c.num_hidden_layers)), causal=(False,) * DFLASH_LAYERS,
                          sliding_window=(None,) * DFLASH_LAYERS, vocab_size=c.vocab_size, num_target_layers=c.num_hidden_layers,
                          rms_norm_eps=c.rms_norm_eps, rope_theta=float(getattr(c, "rope_theta", None) or 10000.0))
    device = next(model.parameters()).device
    with torch.device(device):
        net = DFlashNet(config, c.hidden_size).to(dtype)
    write_v1(directory, net, dtype)
    del net
    free_memory()
    return directory


@dataclass(frozen=True)
class DrafterCheck:
    label: str
    make: Callable[[Target, Setup], Drafter]


def registered(name: str, **options) -> Callable[[Target, Setup], Drafter]:
    """A drafter built through its entry point, with options as `-o key=value` gives them."""
    return lambda target, setup: drafter_class(name).build(target, **options)


def random_eagle(version: int) -> Callable[[Target, Setup], Drafter]:
    """EAGLE-2's dynamic tree (its published defaults) over a random EAGLE-`version` checkpoint."""
    name = "eagle" if version == 1 else "eagle3"
    return lambda target, setup: drafter_class(name).build(target, weights=str(setup.eagle_checkpoint(version)))


def random_dflash(**options) -> Callable[[Target, Setup], Drafter]:
    """DFlash over the random v1 checkpoint: the full block (a chain of 15), or a tree option."""
    return lambda target, setup: drafter_class("dflash").build(target, weights=str(setup.dflash_checkpoint()), **options)


def random_draft(target: Target, setup: Setup) -> Drafter:
    return DraftModelDrafter(target, setup.draft_model(), k=4, model_name=f"random {DRAFT_SHAPE[setup.shape]}")


# One line per drafter; plain decoding first (the baseline the others are compared with).
DRAFTERS = [
    DrafterCheck(PLAIN, lambda target, setup: PlainDecoding(target)),
    DrafterCheck("prompt-lookup", registered("prompt-lookup")),
    DrafterCheck("draft-model", random_draft),
    DrafterCheck("medusa", registered("medusa", heads="fresh", tree=TREE, num_heads=5)),
    DrafterCheck("hydra", registered("hydra", heads="fresh", tree=TREE, num_heads=4)),
    # each step's tree pruned to the nodes above a path probability, so its shape varies step by step: random heads'
    # probabilities sit near 1 / vocabulary, and a floor just above that keeps a varying few of the first level's nodes
    DrafterCheck("hydra-pruned", lambda target, setup: drafter_class("hydra").build(
        target, heads="fresh", tree=TREE, num_heads=4, prune_below=1.2 / target.vocab_size)),
    DrafterCheck("hydra-decoder", registered("hydra-decoder", heads="fresh", tree=TREE, decoder_layers=1)),
    DrafterCheck("eagle", random_eagle(1)),
    DrafterCheck("eagle3", random_eagle(3)),
    DrafterCheck("dflash", random_dflash()),
    DrafterCheck("dflash-tree", random_dflash(tree="dynamic")),  # best-first, 32 tokens verified, top 4 per position
]


# --- crashes and warnings ----------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class Outcome:
    """A crash (its one-line message) and the specbench warnings (a failed graph capture) of a check."""

    error: str | None = None
    warnings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def guarded(outcome: Outcome, what: str):
    """Run a check; a crash is recorded in `outcome` (and its traceback printed), not raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecbenchWarning)
        try:
            yield
        except Exception as exc:
            outcome.error = one_line(exc)
            print(f"[gpu_check] {what} crashed:", file=sys.stderr)
            traceback.print_exc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for w in caught:
        if issubclass(w.category, SpecbenchWarning):
            outcome.warnings.append(str(w.message))
            print(f"[gpu_check] {what}: {w.message}", file=sys.stderr)
        else:  # not ours: shown as it would have been
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def log(message: str, started: float) -> None:
    print(f"[gpu_check {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- engines × drafters ------------------------------------------------------------------


@dataclass
class Cell:
    engine: str
    label: str
    outcome: Outcome = field(default_factory=Outcome)
    outputs: list[Decoded] = field(default_factory=list)
    engine_events: EngineFacts = field(default_factory=EngineFacts)  # its warm-up's and timed decodes', as run.json counts them
    spec_vs_plain: dict | None = None
    fast_vs_eager: dict | None = None

    def metrics(self) -> dict:
        steps = [s for d in self.outputs for s in d.steps]
        tokens = sum(len(d.output_ids) for d in self.outputs)
        wall_ms = sum(d.wall_ms for d in self.outputs)
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        return {
            "prompts": len(self.outputs),
            "new_tokens": tokens,
            "steps": len(steps),
            "tokens_per_s": tokens / wall_ms * 1000 if wall_ms else None,
            "draft_ms": mean([s.draft_ms for s in steps]),
            "verify_ms": mean([s.verify_ms for s in steps]),
            "tree_nodes": mean([s.tree_size for s in steps]),  # drafted per step (a pruned tree's vary)
            "tree_sizes": len({s.tree_size for s in steps}),  # how many different sizes were verified
            "tau": tau(steps) if steps else None,
        }

    def to_json(self) -> dict:
        events = self.engine_events
        return {
            "engine": self.engine, "drafter": self.label, **self.metrics(), "error": self.outcome.error,
            "warnings": self.outcome.warnings, "warm_up_graphs": events.graphs, "warm_up_capture_ms": events.capture_ms,
            "timed_captures": events.timed_captures, "timed_capture_ms": events.timed_capture_ms,
            "timed_regrowths": events.timed_regrowths, "spec_vs_plain": self.spec_vs_plain, "fast_vs_eager": self.fast_vs_eager,
        }


def run_engine(engine: str, target: Target, setup: Setup, checks: list[DrafterCheck], started: float) -> list[Cell]:
    """Every drafter on one engine: built, warmed up as `specbench run` warms up (engine/loop.py
    `warm_up`), then the prompts decoded with the drafters interleaved per prompt, so drifts in
    machine speed hit all alike. A crash stays in its cell (`guarded`)."""
    cells = [Cell(engine, check.label) for check in checks]
    drafters: dict[str, Drafter] = {}
    for cell, check in zip(cells, checks):
        with guarded(cell.outcome, f"{engine}/{cell.label}: build"):
            drafters[cell.label] = check.make(target, setup)
    longest_prompt = max(p.numel() for p in setup.prompts)
    # the engine's caches planned once, for the drafter reaching furthest
    positions = max((d.furthest_position(longest_prompt, setup.new_tokens) for d in drafters.values()), default=0)
    for cell in cells:
        if cell.label not in drafters:
            continue
        log(f"{engine}/{cell.label}: warm-up", started)
        with guarded(cell.outcome, f"{engine}/{cell.label}: warm-up"):
            cell.engine_events.set_warm_up(warm_up(target, drafters[cell.label], positions, setup.prompts[0], setup.new_tokens))
        if cell.outcome.error:
            del drafters[cell.label]
    log(f"{engine}: timing {len(drafters)} drafters on {len(setup.prompts)} prompts", started)
    for index, prompt in enumerate(setup.prompts):
        for cell in cells:
            if cell.label not in drafters:
                continue
            with counted() as seen, guarded(cell.outcome, f"{engine}/{cell.label}: decode"):
                cell.outputs.append(decode(target, drafters[cell.label], prompt, setup.new_tokens))
            cell.engine_events.add_timed(seen, f"prompt {index}")
            if cell.outcome.error:
                cell.outputs.clear()
                del drafters[cell.label]
    drafters.clear()
    free_memory()
    return cells


def compare(reference: list[Decoded], other: list[Decoded], eps: float) -> dict | None:
    """Per prompt: equal token for token, or the first differing token classified as a near-tie
    (rounding can flip it) or a divergence, from the top-2 logits of both paths there."""
    if not reference or len(reference) != len(other):
        return None
    equal, found = 0, []
    for index, (a, b) in enumerate(zip(reference, other)):
        diagnosis = compare_decodes(a, b, eps)
        if diagnosis is None:
            equal += 1
        else:
            found.append({"prompt": index, **vars(diagnosis)})
    return {"equal": equal, "total": len(reference), "near_ties": sum(d["kind"] == NEAR_TIE for d in found),
            "divergences": sum(d["kind"] == DIVERGENCE for d in found), "differing": found}


def equal_text(result: dict | None) -> str:
    """e.g. "2/3 (1 near-tie, 0 divergences)"."""
    if result is None:
        return "-"
    text = f"{result['equal']}/{result['total']}"
    if result["equal"] == result["total"]:
        return text
    ties, divs = result["near_ties"], result["divergences"]
    return f"{text} ({ties} near-tie{'' if ties == 1 else 's'}, {divs} divergence{'' if divs == 1 else 's'})"


# --- the other sections ------------------------------------------------------------------


def bandwidth_section(setup: Setup, fast: Target, cells: list[Cell]) -> dict:
    """Plain tokens/s as a fraction of the memory-bound limit: weight bytes per forward /
    measured device-to-device copy bandwidth (as scripts/bench_engine.py computes it)."""
    nbytes = 1 << 30 if setup.device.type == "cuda" else 1 << 26
    bandwidth = copy_bandwidth(setup.device, nbytes)
    forward = fast.forward_bytes()
    limit = bandwidth / forward
    plain = {c.engine: c.metrics()["tokens_per_s"] for c in cells if c.label == PLAIN and c.outputs}
    return {"forward_bytes": forward, "copy_bandwidth_GB_s": bandwidth / 1e9, "limit_tokens_per_s": limit,
            "plain_tokens_per_s": plain, "fraction": {engine: tps / limit for engine, tps in plain.items()}}


def profile_section(setup: Setup, targets: dict[str, Target], sizes: list[int], reps: int, prompt_tokens: int) -> dict:
    """Verify latency t(n): one forward of n tokens (root + a chain of n-1) after a prompt."""
    prompt = setup.prompts[0][:prompt_tokens]
    ms = verify_profile(targets, prompt, sizes, reps)
    return {"context_tokens": prompt.numel(), "reps": reps, "ms": ms}


def batch_section(setup: Setup, eager: Target, plain: list[Decoded], sizes: list[int], eps: float) -> dict:
    """Batch > 1 (docs/batch.md): plain decoding and the random draft model at each B on the batch
    engine (a static KV cache per row, uncompiled), max(B, prompts) sequences so every row is busy:
    aggregate tokens/s, the speedup at that B, τ, and every row against the eager engine's plain
    decode of its prompt."""
    out = {}
    for b in sizes:
        prompts = [setup.prompts[i % len(setup.prompts)] for i in range(max(b, len(setup.prompts)))]
        reference = [plain[i % len(plain)] for i in range(len(prompts))]
        point: dict = {"sequences": len(prompts)}
        cuda = eager.device.type == "cuda"
        variants = [("", False)] + ([(" (graphs)", True)] if cuda else [])  # the batch engine uncaptured, and on CUDA captured
        for suffix, graphs in variants:
            for name, make in ((PLAIN, lambda: PlainDecoding(eager)), ("draft-model", lambda: random_draft(eager, setup))):
                label = name + suffix
                drafter, target = make(), RowsHFTarget(eager, b, graphs=graphs)
                if cuda:  # the memory plan's estimate against the measured peak above what was held before the rows' cache
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    held = torch.cuda.memory_allocated()
                longest = max(p.numel() for p in prompts)
                positions, verify = drafter.furthest_position(longest, setup.new_tokens), 1 + drafter.max_draft_tokens
                # refused in one line where the KV and activations do not fit; captures (graphs); one short untimed batch
                warm_up_rows(target, [drafter], positions, prompts[:b], setup.new_tokens, prompt_tokens=longest)
                kv, activations = target.memory_needed(b, positions, verify, longest)
                captured = target.decoder.captures
                batch = decode_rows(target, drafter, [Request(p, setup.new_tokens) for p in prompts])
                tokens = sum(len(d.output_ids) for d in batch.decoded)
                point[label] = {"tokens_per_s": tokens / batch.wall_ms * 1000, "tau": tau([s for d in batch.decoded for s in d.steps]),
                                "equal_to_eager_plain": compare(reference, batch.decoded, eps),
                                "planned_gib": {"kv": kv / 2**30, "activations": activations / 2**30},
                                "graphs": target.engine_stats()["cuda_graphs"], "warm_up_captures": captured,
                                "timed_captures": target.decoder.captures - captured}
                if cuda:
                    point[label]["peak_gib_above_before"] = (torch.cuda.max_memory_allocated() - held) / 2**30
        if cuda:
            point["speedup (graphs)"] = point["draft-model (graphs)"]["tokens_per_s"] / point[PLAIN + " (graphs)"]["tokens_per_s"]
        point["speedup"] = point["draft-model"]["tokens_per_s"] / point[PLAIN]["tokens_per_s"]
        out[b] = point
        free_memory()
    return {"engine": "batch engine: static KV cache per row, uncaptured, and on CUDA also captured (graphs)", "sizes": out}


def capture_section(cells: list[Cell], fast: Target, expected: bool) -> dict:
    """What the fast engine captured in its warm-ups, and whether anything was captured while timed."""
    mine = [c for c in cells if c.engine == "fast"]
    stats = fast.engine_stats()
    return {
        "graphs_expected": expected,
        "cuda_graphs": bool(stats.get("cuda_graphs")),
        "warm_up_graphs": sum(c.engine_events.graphs for c in mine),
        "warm_up_capture_ms": round(sum(c.engine_events.capture_ms for c in mine), 3),
        "timed_captures": sum(c.engine_events.timed_captures for c in mine),
        "timed_regrowths": sum(c.engine_events.timed_regrowths for c in mine),
        "target": stats,  # the target's decoder: graphs alive, captures, capture ms, KV capacity
    }


def deepspeed_section(setup: Setup, hf: Target, eps: float, started: float) -> dict:
    """DeepSpeed TP = 1 against hf, both on the fast engine: plain tokens/s and token equality.
    DeepSpeed wraps its own copy of the model (init_inference converts and moves the module it gets)."""
    import torch.distributed as dist

    from specbench.targets import deepspeed

    log("deepspeed: one-rank group, wrapping a copy of the model (TP = 1)", started)
    try:
        device = deepspeed.join_group(setup.device, 1)  # imports deepspeed first
    except (ImportError, UserError) as exc:  # not installed, or its own dependencies missing
        return {"skipped": f"deepspeed is not importable ({one_line(exc)}); docs/gpu.md says how to install or carry it"}
    try:
        module = deepspeed.shard(copy.deepcopy(setup.model), device, setup.dtype, 1)
        ds = FastHFTarget(module, name="deepspeed", backend="deepspeed", bucketed=True, compiled=False)
        ds.eos_token_ids = set()
        targets = {"hf": hf, "deepspeed": ds}
        positions = PlainDecoding(hf).furthest_position(max(p.numel() for p in setup.prompts), setup.new_tokens)
        for target in targets.values():
            warm_up(target, PlainDecoding(target), positions, setup.prompts[0], setup.new_tokens)
        outputs: dict[str, list[Decoded]] = {name: [] for name in targets}
        log("deepspeed: timing plain decoding, hf and deepspeed interleaved", started)
        with counted() as seen:
            for prompt in setup.prompts:
                for name, target in targets.items():
                    outputs[name].append(decode(target, PlainDecoding(target), prompt, setup.new_tokens))
        tps = {name: sum(len(d.output_ids) for d in out) / sum(d.wall_ms for d in out) * 1000 for name, out in outputs.items()}
        ratio = tps["deepspeed"] / tps["hf"]
        return {"version": environment(setup.device)["deepspeed"], "plain_tokens_per_s": tps, "ratio": ratio,
                "target_ratio": DS_TARGET_RATIO, "met": ratio >= DS_TARGET_RATIO,
                "cuda_graphs": bool(ds.engine_stats().get("cuda_graphs")), "timed_captures": seen.captures,
                "equal_to_hf": compare(outputs["hf"], outputs["deepspeed"], eps)}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the table ----------------------------------------------------------------------------


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def check_lines(report: dict) -> list[str]:
    """The checks beyond the engines × drafters cells, a line each."""
    lines = []
    sections = report["sections"]
    b = sections.get("bandwidth", {})
    if b.get("error"):
        lines.append(f"bandwidth: CRASHED {b['error']}")
    elif b:
        frac = b["fraction"]
        lines.append(
            f"bandwidth: {size(b['forward_bytes'])} per forward / {b['copy_bandwidth_GB_s']:.0f} GB/s copy = "
            f"{b['limit_tokens_per_s']:.1f} tokens/s limit; plain decoding "
            + ", ".join(f"{e} {b['plain_tokens_per_s'][e]:.1f} tokens/s = {frac[e]:.1%}" for e in frac)
        )
    p = sections.get("verify_ms", {})
    if p.get("error"):
        lines.append(f"t(n): CRASHED {p['error']}")
    elif p:
        for engine, ms in p["ms"].items():
            shown = [n for n in SPEEDS if n in ms]
            first = min(ms)
            ratios = ", ".join(f"t({n})/t({first}) = {ms[n] / ms[first]:.2f}" for n in sorted({64, max(ms)}) if n in ms and n != first)
            lines.append(f"t(n) ms {engine:5}: " + "  ".join(f"{n}:{ms[n]:.2f}" for n in shown) + (f"  ({ratios})" if ratios else ""))
    c = sections.get("capture", {})
    if c.get("error"):
        lines.append(f"capture: CRASHED {c['error']}")
    elif c:
        t = c["target"]
        graphs = "CUDA graphs on" if c["cuda_graphs"] else "CUDA graphs OFF: a capture failed" if c["graphs_expected"] else "no graphs"
        lines.append(
            f"capture (fast engine, {graphs}): warm-ups captured {c['warm_up_graphs']} graphs in {c['warm_up_capture_ms']:.0f} ms "
            f"(target decoder: {t.get('graphs', 0)} graphs alive, KV capacity {t.get('capacity')}); "
            f"inside timed decodes: {c['timed_captures']} captures, {c['timed_regrowths']} cache regrowths"
        )
    bt = sections.get("batch", {})
    if bt.get("error"):
        lines.append(f"batch: CRASHED {bt['error']}")
    for b, point in bt.get("sizes", {}).items():
        plain, draft = point[PLAIN], point["draft-model"]
        lines.append(
            f"batch {b} ({point['sequences']} sequences, {bt['engine']}): plain {plain['tokens_per_s']:.1f} tokens/s, draft-model "
            f"{draft['tokens_per_s']:.1f} tokens/s = {point['speedup']:.2f}x, τ {draft['tau']:.2f}; rows = eager plain: "
            f"plain {equal_text(plain['equal_to_eager_plain'])}, draft-model {equal_text(draft['equal_to_eager_plain'])}"
        )
    d = sections.get("deepspeed", {})
    if d.get("error"):
        lines.append(f"DeepSpeed TP 1: CRASHED {d['error']}")
    elif d.get("skipped"):
        lines.append(f"DeepSpeed TP 1: skipped: {d['skipped']}")
    elif d:
        tps = d["plain_tokens_per_s"]
        lines.append(
            f"DeepSpeed {d['version']} TP 1 vs hf, fast engine, plain decoding: {tps['deepspeed']:.1f} vs {tps['hf']:.1f} tokens/s = "
            f"{d['ratio']:.3f}x (target >= {d['target_ratio']:.2f}: {'met' if d['met'] else 'NOT met'}); "
            f"tokens equal to hf {equal_text(d['equal_to_hf'])}; CUDA graphs {'on' if d['cuda_graphs'] else 'off'}"
        )
    failures = report["failures"]
    lines.append("result: every check ran" if not failures else f"result: {len(failures)} FAILED: " + "; ".join(failures))
    return lines


def show(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["setup"]
    print(
        f"gpu_check: random-weight {s['shape']} target ({s['dtype']}) on {s['device_name']}; torch {s['torch']}, "
        f"transformers {s['transformers']}; {s['prompts']} prompts x {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens "
        f"forced (EOS ignored); fast engine: {s['fast_engine']}; {report['elapsed_s']:.0f} s in all"
    )
    table = Table()
    columns = ("engine", "drafter", "tok/s", "x plain", "draft ms", "verify ms", "τ", "spec = plain", "fast = eager", "warm-up graphs", "note")
    for column in columns:
        table.add_column(column, justify="left" if column in ("engine", "drafter", "note") else "right")
    plain = {c["engine"]: c["tokens_per_s"] for c in report["cells"] if c["drafter"] == PLAIN}
    for cell in report["cells"]:
        notes = []
        if cell["error"]:
            notes.append(f"CRASHED {cell['error']}")
        if cell["timed_captures"] or cell["timed_regrowths"]:
            notes.append(f"{cell['timed_captures']} captures / {cell['timed_regrowths']} regrowths inside timed decodes")
        notes += cell["warnings"]
        graphs = f"{cell['warm_up_graphs']} ({cell['warm_up_capture_ms']:.0f} ms)" if cell["engine"] == "fast" else "-"
        base = plain.get(cell["engine"])
        speedup = cell["tokens_per_s"] / base if cell["tokens_per_s"] and base else None
        table.add_row(
            cell["engine"], cell["drafter"], fmt(cell["tokens_per_s"], ".1f"), fmt(speedup), fmt(cell["draft_ms"]),
            fmt(cell["verify_ms"]), fmt(cell["tau"]), equal_text(cell["spec_vs_plain"]), equal_text(cell["fast_vs_eager"]), graphs,
            "; ".join(notes),
        )
    Console(width=250).print(table)
    for line in check_lines(report):
        print(line)


# --- main -----------------------------------------------------------------------------------


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompts of a repeated 16-token motif each (so prompt lookup finds n-grams), one motif per prompt."""
    generator = torch.Generator().manual_seed(seed)
    motifs = [torch.randint(3, min(vocab, 1000), (16,), generator=generator) for _ in range(count)]
    return [motif.repeat(-(-length // 16))[:length] for motif in motifs]


def parse_sizes(text: str) -> list[int]:
    if "-" in text:
        low, high = map(int, text.split("-"))
        return list(range(low, high + 1))
    return [int(n) for n in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--shape", choices=sorted(DRAFT_SHAPE), help="target shape (default: vicuna-7b on CUDA, tiny on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, help="default: 128 on CUDA, 32 on CPU")
    parser.add_argument("--new-tokens", type=int, help="forced new tokens per prompt (default: 96 on CUDA, 32 on CPU)")
    parser.add_argument("--sizes", default="1-128", help="t(n) sizes: a range LOW-HIGH or a comma list")
    parser.add_argument("--reps", type=int, default=3, help="t(n): timed rounds (medians)")
    parser.add_argument("--drafters", help=f"comma list, a subset of {','.join(c.label for c in DRAFTERS)} (plain always runs)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed section")
    parser.add_argument("--batch-sizes", default="1,8,32", help="batch section: comma list of B (docs/batch.md)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="where the JSON goes")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except UserError as exc:
        parser.error(str(exc))
    cuda = device.type == "cuda"
    shape = args.shape or ("vicuna-7b" if cuda else "tiny")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if cuda else torch.float32)
    prompt_tokens = args.prompt_tokens or (128 if cuda else 32)
    new_tokens = args.new_tokens or (96 if cuda else 32)
    checks = DRAFTERS
    if args.drafters:
        wanted = {name.strip() for name in args.drafters.split(",")} | {PLAIN}
        unknown = wanted - {c.label for c in DRAFTERS}
        if unknown:
            parser.error(f"unknown drafters {', '.join(sorted(unknown))}: choose from {', '.join(c.label for c in DRAFTERS)}")
        checks = [c for c in DRAFTERS if c.label in wanted]

    log(f"building the random-weight {shape} target ({dtype}) on {device}", started)
    model = random_model(shape, device, dtype, seed=0)
    free_memory()  # transformers initialises in fp32 first
    prompts = [p.to(device) for p in make_prompts(args.prompts, prompt_tokens, model.config.vocab_size)]
    setup = Setup(device, dtype, shape, prompts, new_tokens, model)
    targets = {"eager": HFTarget(model, name=f"random-{shape}"), "fast": FastHFTarget(model, name=f"random-{shape}", bucketed=True, compiled=False)}
    for target in targets.values():
        target.eos_token_ids = set()  # a forced fixed length
    graphs = targets["fast"].decoder.graphs is not None  # CUDA graphs (or a test's stand-in)
    eps = rounding_eps(dtype, targets["eager"].hidden_size, device)
    env = environment(device)
    report: dict = {
        "setup": {
            "shape": shape, "draft_shape": DRAFT_SHAPE[shape], "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "device_name": env["device_name"], "torch": env["torch"], "transformers": env["transformers"], "cuda": env["cuda"],
            "python": env["python"], "git_revision": env["git_revision"], "cpu_threads": torch.get_num_threads(),
            "prompts": len(prompts), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "tree": TREE,
            "fast_engine": "bucketed, CUDA graphs" if graphs else "bucketed, no graphs",
            "rounding_eps": eps,
        },
        "cells": [], "sections": {}, "failures": [],
    }

    cells: list[Cell] = []
    for engine in ENGINES:
        cells += run_engine(engine, targets[engine], setup, checks, started)
    by_key = {(c.engine, c.label): c for c in cells}
    for cell in cells:
        if cell.label != PLAIN:
            cell.spec_vs_plain = compare(by_key[cell.engine, PLAIN].outputs, cell.outputs, eps)
        if cell.engine == "fast":
            cell.fast_vs_eager = compare(by_key["eager", cell.label].outputs, cell.outputs, eps)
    for cell in cells:
        if cell.outcome.error:
            report["failures"].append(f"{cell.engine}/{cell.label}: {cell.outcome.error}")
        if graphs and cell.outcome.warnings:  # a failed capture: the fast engine's numbers are not graphs'
            report["failures"].append(f"{cell.engine}/{cell.label}: {cell.outcome.warnings[0]}")
    report["cells"] = [c.to_json() for c in cells]

    def section(name: str, run: Callable[[], dict]) -> None:
        outcome = Outcome()
        log(f"section {name}", started)
        with guarded(outcome, name):
            report["sections"][name] = run()
        if outcome.error:
            report["sections"][name] = {"error": outcome.error}
            report["failures"].append(f"{name}: {outcome.error}")
        if outcome.warnings:
            report["sections"].setdefault(name, {})["warnings"] = outcome.warnings
            if graphs:
                report["failures"].append(f"{name}: {outcome.warnings[0]}")

    section("bandwidth", lambda: bandwidth_section(setup, targets["fast"], cells))
    section("capture", lambda: capture_section(cells, targets["fast"], graphs))  # before t(n) captures its own buckets
    section("verify_ms", lambda: profile_section(setup, targets, parse_sizes(args.sizes), args.reps, prompt_tokens))
    eager_plain = by_key["eager", PLAIN].outputs
    section("batch", lambda: batch_section(setup, targets["eager"], eager_plain, parse_sizes(args.batch_sizes), eps))
    targets["eager"].cache = None  # the eager engine is done: its cache goes before DeepSpeed's copy comes
    setup._draft = None
    free_memory()
    if args.no_deepspeed:
        report["sections"]["deepspeed"] = {"skipped": "--no-deepspeed"}
    else:
        section("deepspeed", lambda: deepspeed_section(setup, targets["fast"], eps, started))
    if graphs and not report["sections"].get("capture", {}).get("cuda_graphs", True):
        report["failures"].append("capture: the fast engine ended without CUDA graphs (a capture failed; see the warnings)")

    report["elapsed_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    show(report)
    print(f"JSON: {args.out}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
