"""`specbench run`: a workload through target + drafter, and the plain baseline.

For each prompt and turn the baseline (plain decoding) and the drafter run
back to back in the same process, through the same decode loop, so the
speedup compares like with like and drifts in machine speed hit both alike.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from specbench.checks import check_count, check_fits, check_number, context_window
from specbench.drafters.base import PlainDecoding, build_drafter, check_options
from specbench.engine.loop import decode
from specbench.errors import UserError
from specbench.records import BASELINE, SPEC, RunInfo, StepRecord, TurnRecord, first_divergence
from specbench.store import RunStore
from specbench.targets.fast import resolve_engine, target_class
from specbench.targets.hf import HFTarget
from specbench.targets.loading import load_config, load_tokenizer, resolve_device, resolve_dtype
from specbench.workloads import Prompt, check_prompts_fit, encode_turn, open_workload, select, workload_hash

WARMUP_TOKENS = 16
BACKENDS = ("hf", "deepspeed")


@dataclass
class RunConfig:
    target: str = "smollm2-135m"
    drafter: str = "prompt-lookup"
    drafter_options: dict[str, Any] = field(default_factory=dict)
    workload: str = "builtin"
    workload_file: str | None = None  # the published file a named workload reads (else its default place or the hub)
    categories: list[str] | None = None  # keep these categories (or tasks)
    limit: int | None = None
    shard: str | None = None  # "i/n": every n-th prompt from the i-th (1-based), after categories and limit
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    engine: str = "auto"  # auto | eager | fast (targets/fast.py); the baseline runs on the same engine
    baseline: bool = True
    warmup: bool = True
    backend: str = "hf"  # target backend: hf, or deepspeed (tensor parallel over `tp` ranks)
    tp: int = 1


def environment(device: torch.device) -> dict[str, Any]:
    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    try:
        git = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "specbench": pkg("specbench"),
        "torch": torch.__version__,
        "transformers": pkg("transformers"),
        "deepspeed": pkg("deepspeed"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "git_revision": git,
    }


def run_id_for(config: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{config.target}-{config.drafter}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def turn_seed(seed: int, prompt_id: str, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class Benchmark:
    """Loads what a run needs once, then measures prompts into a RunStore."""

    def __init__(self, config: RunConfig, target: HFTarget | None = None) -> None:
        self.config = config
        self.check(config)
        self.workload = open_workload(config.workload, config.workload_file)
        self.prompts = select(self.workload.prompts, config.categories, config.limit, config.shard)
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        fits_checked = False
        if target is None:  # prompts past the context window are refused before any weights load
            window = context_window(load_config(config.target))
            tokenizer = load_tokenizer(config.target) if window else None
            if tokenizer is not None:
                check_prompts_fit(self.prompts, tokenizer, window, config.max_new_tokens, config.target)
                fits_checked = True
        self.target = target or load_target(config, self.device, dtype)
        self.window = context_window(self.target.config)
        self.device = self.target.device  # a tensor-parallel rank may sit on its own GPU
        if not self.target.leads:
            return  # a follower rank only serves the leader's target calls (DeepSpeedTarget.follow)
        try:
            if self.target.tokenizer is None:
                raise UserError(f"target '{config.target}' has no tokenizer; text workloads need one")
            if not fits_checked:
                check_prompts_fit(self.prompts, self.target.tokenizer, self.window, config.max_new_tokens, config.target)
            self.drafter = build_drafter(config.drafter, self.target, dict(config.drafter_options))
            self.draft_depth = check_tree_fits(self.drafter, self.window, config.target)
            if self.draft_depth:  # a tree drafter's last draft reaches past the output by its depth
                check_prompts_fit(self.prompts, self.target.tokenizer, self.window, config.max_new_tokens, config.target, self.draft_depth)
        except BaseException:
            self.target.stop()
            raise
        self.plain = PlainDecoding(self.target)

    @staticmethod
    def check(config: RunConfig) -> None:
        """Everything about a configuration that can be refused before any weights load."""
        check_options(config.drafter, config.drafter_options)
        check_count(config.max_new_tokens, "--max-new-tokens")
        check_count(config.limit, "--limit")
        check_count(config.tp, "--tp")
        check_count(config.seed, "--seed", minimum=0, maximum=2**63 - 1)
        check_number(config.temperature, "--temperature", minimum=0)
        if config.backend not in BACKENDS:
            raise UserError(f"unknown backend '{config.backend}': use {' or '.join(BACKENDS)}")
        if config.backend == "hf" and config.tp != 1:
            raise UserError("--tp needs --backend deepspeed (the hf backend runs on one device)")
        if config.backend == "deepspeed":
            from specbench.targets import deepspeed

            deepspeed.require_deepspeed()
            device = resolve_device(config.device)
            deepspeed.check(load_config(config.target), config.tp, device, resolve_dtype(config.dtype, device))
        if config.backend == "deepspeed" and config.engine == "fast":
            raise UserError("--engine fast runs on the hf backend only; use --engine eager with --backend deepspeed")

    def run_info(self, command: str) -> RunInfo:
        c = self.config
        decode_settings = {k: v for k, v in asdict(c).items() if k not in ("target", "drafter", "drafter_options", "workload")}
        decode_settings["dtype"] = str(self.target.dtype).removeprefix("torch.")
        decode_settings["engine"] = getattr(self.target, "engine", "eager")
        return RunInfo(
            run_id=run_id_for(c),
            command=command,
            target=c.target,
            target_id=self.target.model_id,
            drafter=c.drafter,
            drafter_options=c.drafter_options,
            workload=c.workload,
            workload_hash=workload_hash(self.prompts),
            decode=decode_settings,
            environment=environment(self.device),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra={
                "target_forward_bytes": self.target.forward_bytes(),
                "draft_forward_bytes": self.drafter.memory_model()[0],
                "draft_passes_per_step": self.drafter.memory_model()[1],
                "drafter": self.drafter.describe(),
                "workload": {
                    "format": self.workload.format,
                    "source": self.workload.source,
                    "prompts": len(self.prompts),
                    # the selection before sharding: shards of one workload share it, so `report` can merge them
                    "selection_hash": workload_hash(select(self.workload.prompts, c.categories, c.limit)),
                },
            },
        )

    def _decode(self, drafter, prompt: Prompt, turn: int, answers: list[str]):
        ids = encode_turn(self.target.tokenizer, prompt, turn, answers)
        # later turns hold the model's own answers: known only now, checked before their prefill
        check_fits(len(ids), self.config.max_new_tokens, self.window, f"prompt {prompt.id} turn {turn + 1}", self.config.target,
                   self.draft_depth if drafter is self.drafter else 0)
        generator = None
        if self.config.temperature > 0:
            generator = torch.Generator().manual_seed(turn_seed(self.config.seed, prompt.id, turn))
        result = decode(self.target, drafter, torch.tensor(ids), self.config.max_new_tokens, self.config.temperature, generator)
        return ids, result

    def warm_up(self) -> None:
        """One short untimed decode in each mode: first-call costs (allocations, kernel selection) stay out of the numbers."""
        saved = self.config.max_new_tokens
        self.config.max_new_tokens = min(saved, WARMUP_TOKENS)
        try:
            for drafter in (self.plain, self.drafter):
                self._decode(drafter, self.prompts[0], 0, [])
        finally:
            self.config.max_new_tokens = saved

    def measure_prompt(self, prompt: Prompt) -> tuple[list[StepRecord], list[TurnRecord]]:
        modes = [(BASELINE, self.plain)] if self.config.baseline else []
        modes.append((SPEC, self.drafter))
        answers: dict[str, list[str]] = {mode: [] for mode, _ in modes}
        outputs: dict[tuple[str, int], list[int]] = {}
        steps: list[StepRecord] = []
        turns: list[TurnRecord] = []
        for turn in range(len(prompt.turns)):
            for mode, drafter in modes:
                ids, result = self._decode(drafter, prompt, turn, answers[mode])
                outputs[mode, turn] = result.output_ids
                answers[mode].append(self.target.tokenizer.decode(result.output_ids, skip_special_tokens=True))
                steps += [StepRecord(**asdict(s), prompt_id=prompt.id, turn=turn, mode=mode, step=i) for i, s in enumerate(result.steps)]
                record = TurnRecord(
                    prompt_id=prompt.id,
                    turn=turn,
                    mode=mode,
                    category=prompt.category,
                    task=prompt.task or prompt.category,
                    prompt_tokens=len(ids),
                    new_tokens=len(result.output_ids),
                    steps=len(result.steps),
                    wall_ms=result.wall_ms,
                    ttft_ms=result.ttft_ms,
                    output_ids=result.output_ids,
                    text=answers[mode][-1],
                )
                if mode == SPEC and (BASELINE, turn) in outputs:
                    record.first_divergence = first_divergence(result.output_ids, outputs[BASELINE, turn])
                    record.exact_match = record.first_divergence is None
                turns.append(record)
        return steps, turns

    def records_per_prompt(self) -> dict[str, int]:
        modes = 2 if self.config.baseline else 1
        return {p.id: modes * len(p.turns) for p in self.prompts}

    def run(self, store: RunStore, on_prompt: Callable[[Prompt], None] = lambda p: None) -> None:
        """Measure every prompt not yet complete in `store`. A run this process created that fails
        or is interrupted before its first prompt is finished leaves no directory behind."""
        try:
            done = store.keep_complete(self.records_per_prompt())
            todo = [p for p in self.prompts if p.id not in done]
            if todo and self.config.warmup:
                self.warm_up()
            for prompt in self.prompts:
                if prompt.id in done:
                    on_prompt(prompt)
                    continue
                steps, turns = self.measure_prompt(prompt)
                store.append_prompt(steps, turns)
                on_prompt(prompt)
        except BaseException:
            store.discard()
            raise
        store.info.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        store.write_info()


def check_tree_fits(drafter, window: int | None, model: str) -> int:
    """A tree drafter drafts its whole tree whatever room is left, so its depth counts toward the
    context window (chain drafters stop at the token budget); a tree of more nodes than the window
    cannot be verified in one forward. Returns the positions a draft may add past the output."""
    shape = getattr(drafter, "shape", None)
    if shape is None:
        return 0
    if window and len(shape) + 1 > window:
        raise UserError(f"tree '{shape.name}' has {len(shape)} nodes: verifying it is one forward of {len(shape) + 1} tokens, "
                        f"past the {window}-token context window of {model}; use a smaller --tree")
    return shape.depth


def load_target(config: RunConfig, device: torch.device, dtype: torch.dtype) -> HFTarget:
    if config.backend == "deepspeed":
        from specbench.targets.deepspeed import DeepSpeedTarget

        return DeepSpeedTarget.load(config.target, device, dtype, config.tp)
    return target_class(resolve_engine(config.engine, device)).load(config.target, device, dtype)


def config_from_info(info: RunInfo) -> RunConfig:
    """The configuration a stored run was started with (for --resume)."""
    settings = {k: v for k, v in info.decode.items() if k in RunConfig.__dataclass_fields__}
    return RunConfig(
        target=info.target,
        drafter=info.drafter,
        drafter_options=info.drafter_options,
        workload=info.workload,
        **settings,
    )


# flags whose "auto" is resolved when the run starts (run.json keeps what it resolved to)
RESOLVED_AT_START = ("dtype", "engine")


def resume_conflicts(info: RunInfo, given: dict[str, Any]) -> list[str]:
    """The flags in `given` (the flag as typed -> its value: '--max-new-tokens' -> 8, '-o k' -> 3;
    only flags the user typed) that disagree with the stored run, each as 'FLAG VALUE (the run has
    STORED)'. Run settings are compared with its configuration, anything else with its drafter options."""
    config = config_from_info(info)
    fields = RunConfig.__dataclass_fields__
    conflicts = []
    for flag, value in given.items():
        name = flag.removeprefix("-o ").lstrip("-").replace("-", "_")
        if name == "out":
            conflicts.append(f"--out {value} (a resumed run stays in its own directory)")
            continue
        if name in fields and name != "drafter_options" and not flag.startswith("-o "):
            stored = getattr(config, name)
            if name in RESOLVED_AT_START and value == "auto":
                continue
        else:
            stored = config.drafter_options.get(name)
        if _comparable(value) != _comparable(stored):
            typed = f"-o {name}={_shown(value)}" if flag.startswith("-o ") else f"{flag} {_shown(value)}"
            conflicts.append(f"{typed} (the run has {_shown(stored)})")
    return conflicts


def _comparable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def resume_run(directory: Path, given: dict[str, Any] | None = None) -> tuple[RunStore, RunConfig]:
    """Open a run directory to continue it: its write lock taken (a second writer is refused),
    and every flag the user typed checked against the run's own configuration, which is what
    a resumed run measures with (a conflicting flag is refused, named, never ignored)."""
    from specbench.targets.deepspeed import under_launcher

    store = RunStore.open(Path(directory))
    if not under_launcher() or os.environ.get("RANK", "0") == "0":  # tensor-parallel followers never write
        store.lock()
    try:
        if store.info.extra.get("simulated"):
            raise UserError(f"{directory} is a simulated run (from `specbench simulate`); it has nothing to resume")
        conflicts = resume_conflicts(store.info, given or {})
        if conflicts:
            raise UserError(f"--resume {directory} continues the run as it was started; these flags would change it: "
                            f"{'; '.join(conflicts)}. Drop them, or start a new run")
        return store, config_from_info(store.info)
    except BaseException:
        store.close()
        raise


def command_line() -> str:
    return " ".join(["specbench", *sys.argv[1:]])
