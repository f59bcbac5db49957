"""The adversarial sweep: the specbench CLI driven as a careless or hostile user would drive it.
tests/test_sweep.py runs every case as one parametrised test (mark `sweep`):

    python -m pytest -m sweep tests/test_sweep.py

Every command meets its bad inputs: counts of 0, -5 and 10^12, NaN and negative numbers,
missing / corrupt / non-UTF-8 / pickled / truncated files, directories where files belong and
files where directories belong, unwritable places (/proc), symlinks, pipes and devices where
records belong, paths with spaces and unicode, outputs that would overwrite the command's own
inputs or each other, prompts of 5 MB, prompts past the context window, trees of 0, 10,000 and
a million nodes, rich markup in user text, hand-edited, truncated and newer-schema run
directories, an offline hub. Each must end in ONE line on stderr and exit code 2, with nothing
written and nothing changed (the files each case touches are hashed before and after). A few
well-formed but unusual inputs (the published file shapes, a BOM, spaces and unicode in paths, a
symlinked --out, a category with a comma) must simply work.

Then faults, in real processes (a tiny model saved to a temp dir, so each starts in seconds):
SIGKILL, SIGINT and SIGTERM at fixed points of `run`, `record`, `train-data`, `report` and `tune`
(no temporary file left, an interrupted run resumes to an uninterrupted run's records, an old log
survives byte for byte), two writers of one output (the first held inside its write lock, the
second refused in one line: run directories, logs, data and checkpoint directories, profiles,
tuned trees, id lists, answers, report outputs), parts of a directory that belong to another
write (a record of another run, a checkpoint or data directory killed between two saves), a full
disk as a log or a data directory is written, and odd environments (an ASCII-only terminal, a
plugin that parses argv at import).

Cases are defined by functions that call `Sweep.bad` / `Sweep.good` / `Sweep.check`, which only
record a closure under the case's name: test_sweep.py calls them once with placeholder paths to
learn the names (collection) and once with the real fixtures, then runs one closure per test.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specbench.cli import main

# --- running one command in this process --------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def invoke(argv, limit_s: int = 60, env: dict | None = None) -> tuple[object, str, str, float]:
    """(exit code, stdout, stderr, seconds) of `specbench ARGV` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    sys.argv = ["specbench", *map(str, argv)]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code: object = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Hang:
        code = "hang"
    except BaseException:  # noqa: BLE001 - a crash is a finding, not the end of the sweep
        code = "crash"
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if os.environ.get("SPECBENCH_SWEEP_LOG"):  # the command and what it said, for a report of the sweep
        with open(os.environ["SPECBENCH_SWEEP_LOG"], "a") as f:
            f.write(json.dumps({"argv": ["specbench", *map(str, argv)], "exit": code, "stderr": err.getvalue().strip()[-600:]}) + "\n")
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def fingerprint(path: Path) -> str | None:
    """A hash of a file, or of a directory tree (names and contents), None when absent."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
    elif path.is_dir():
        for item in sorted(path.rglob("*")):
            if item.name == ".lock":
                continue
            digest.update(str(item.relative_to(path)).encode())
            if item.is_file():
                digest.update(item.read_bytes())
    return digest.hexdigest()


class Names(dict):
    """Placeholder paths for collecting case names before the fixtures exist."""

    def __missing__(self, key):
        return Path("/nonexistent-sweep-fixture") / str(key)


@dataclass
class Sweep:
    """Cases by name, each a closure returning its problems (an empty list: clean)."""

    root: Path
    cases: dict[str, Callable[[], list[str]]] = field(default_factory=dict)

    def add(self, name: str, run: Callable[[], list[str]]) -> None:
        assert name not in self.cases, f"two sweep cases are named {name!r}"
        self.cases[name] = run

    def case_dir(self) -> Path:
        return self.root / "cases" / str(len(self.cases))

    def bad(self, name: str, argv: list, says: str | tuple = (), watch: tuple = (), code: int = 2, limit_s: int = 60,
            env: dict | None = None, hold: Path | str | None = None) -> None:
        """A bad input: exit `code`, one line on stderr containing `says`, the watched paths unchanged,
        nothing left in the case's folder. `hold`: an output (a run directory, a file, a data or
        checkpoint directory) whose write lock another writer holds while the command runs."""
        case = self.case_dir()

        def run() -> list[str]:
            args = [str(a).replace("{case}", str(case)) for a in argv]
            case.mkdir(parents=True)
            watched = [Path(str(w).replace("{case}", str(case))) for w in watch]
            before = {w: fingerprint(w) for w in watched}
            entries_before = sorted(p.name for p in case.iterdir())
            with held_lock(Path(str(hold).replace("{case}", str(case)))) if hold else contextlib.nullcontext():
                got, out, err, seconds = invoke(args, limit_s, env)
            lines = [line for line in err.splitlines() if line.strip()]
            problems = []
            if got != code:
                problems.append(f"exit {got}, wanted {code}")
            if len(lines) != 1:
                problems.append(f"{len(lines)} lines on stderr")
            if "Traceback" in err:
                problems.append("a traceback")
            for text in (says,) if isinstance(says, str) else says:
                if text not in err:
                    problems.append(f"message lacks {text!r}")
            for w in watched:
                if fingerprint(w) != before[w]:
                    problems.append(f"{w} changed (data lost)")
            if sorted(p.name for p in case.iterdir()) != entries_before:
                problems.append(f"left {sorted(set(p.name for p in case.iterdir()) - set(entries_before))} behind")
            return problems + ([err.strip()[-1500:]] if problems else [])

        self.add(name, run)

    def good(self, name: str, argv: list, check=lambda out, err: None, limit_s: int = 120, env: dict | None = None) -> None:
        """A well-formed, unusual input: exit 0, no traceback, and `check(out, err)` returns no problem."""
        case = self.case_dir()

        def run() -> list[str]:
            case.mkdir(parents=True, exist_ok=True)
            args = [str(a).replace("{case}", str(case)) for a in argv]
            got, out, err, seconds = invoke(args, limit_s, env)
            problems = [] if got == 0 else [f"exit {got}"]
            if "Traceback" in err:
                problems.append("a traceback")
            if not problems and (found := check(out, err)):
                problems.append(found)
            return problems + (["stdout: " + out.strip()[-800:], "stderr: " + err.strip()[-1500:]] if problems else [])

        self.add(name, run)

    def check(self, name: str, problems: Callable[[], list[str]]) -> None:
        """Anything else: `problems()` says what is wrong, if anything."""
        self.add(name, problems)


# --- fixtures -------------------------------------------------------------------------------------

def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_models(root: Path) -> dict[str, Path]:
    from tiny import char_tokenizer, save_tiny_model, tiny_llama

    m = {"target": save_tiny_model(root / "target", seed=0), "other": save_tiny_model(root / "other", seed=5)}
    draft = tiny_llama(0, vocab=len(char_tokenizer()))
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    draft.save_pretrained(root / "draft")
    char_tokenizer().save_pretrained(root / "draft")
    m["draft"] = root / "draft"
    small = [p for p in (root / "target").iterdir() if p.suffix != ".safetensors"]

    def broken(name: str, weights: dict[str, bytes]) -> Path:
        d = root / name
        d.mkdir()
        for p in small:
            shutil.copy(p, d / p.name)
        for file, data in weights.items():
            (d / file).write_bytes(data)
        return d

    weights = (root / "target" / "model.safetensors").read_bytes()

    class Payload:  # what a hostile checkpoint would run on unpickling: it must never run
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    m["corrupt"] = broken("corrupt", {"model.safetensors": os.urandom(200)})
    m["truncated"] = broken("truncated", {"model.safetensors": weights[: len(weights) // 2]})
    m["pickle"] = broken("pickle", {"pytorch_model.bin": pickle.dumps({"w": Payload()})})
    m["notzip"] = broken("notzip", {"pytorch_model.bin": b"this is not a torch file at all"})
    m["badconfig"] = broken("badconfig", {"model.safetensors": weights})
    (m["badconfig"] / "config.json").write_bytes(b"\xff\xfe{not json")
    m["notmodel"] = root / "notmodel"
    m["notmodel"].mkdir()
    (m["notmodel"] / "config.json").write_text('{"model_type": "no-such-architecture"}')
    m["file"] = root / "just-a-file.txt"
    m["file"].write_text("not a model")
    m["pwned"] = root / "PWNED"
    return m


def make_workloads(root: Path) -> dict[str, Path]:
    w = root / "workloads"
    w.mkdir()
    f = {}
    f["good"] = jsonl(w / "good.jsonl", [{"id": f"g{i}", "category": "c", "turns": [f"Repeat {i} {i} {i} again"]} for i in range(3)])
    # the published shapes: FastChat's mt_bench question.jsonl, Spec-Bench's question.jsonl,
    # DSD's hellaswag.json (JSON Lines under a .json name), the original hellaswag_val.jsonl
    f["fastchat"] = jsonl(w / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Compose a short travel note about a harbour.", "Rewrite it as a limerick."]},
        {"question_id": 111, "category": "math", "turns": ["What is 17 * 3?", "And 17 * 4?"], "reference": ["51", "68"]},
    ])
    f["specbench"] = jsonl(w / "spec_question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write one line about tea.", "Now about coffee."]},
        {"question_id": 161, "category": "translation", "turns": ["Translate German to English: Guten Morgen."]},
        {"question_id": 241, "category": "summarization", "turns": ["Summarize: The council met and agreed on a budget."],
         "reference": ["The council agreed a budget."]},
        {"question_id": 321, "category": "qa", "turns": ["Who wrote Hamlet?"], "reference": ["Shakespeare"]},
    ])
    (w / "hellaswag.json").write_text(
        '{"prompt": "[header] How to fold a map [title] Lay the map flat. [step] Smooth it out, then"}\n'
        '{"prompt": "A man is standing on a ladder next to a wall. he"}\n', encoding="utf-8")
    f["dsd"] = w / "hellaswag.json"
    f["hellaswag"] = jsonl(w / "hellaswag_val.jsonl", [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
         "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
         "source_id": "activitynet~v_-JhWjGDPHMY"},
        {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.", "ctx_b": "she",
         "ctx": "A lady walks to a barbell. she", "split": "val", "split_type": "zeroshot", "label": 0,
         "endings": ["lifts it.", "drops it.", "leaves.", "sits."], "source_id": "activitynet~v_-lJS58hyo1c"},
    ])
    (w / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "b1", "turns": ["Hello there"]}).encode() + b"\n")
    f["bom"] = w / "bom.jsonl"
    (w / "latin1.jsonl").write_bytes(json.dumps({"id": "x", "turns": ["caf"]}).encode()[:-3] + b"\xe9\"]}\n")
    f["latin1"] = w / "latin1.jsonl"
    (w / "empty.jsonl").write_text("")
    f["empty"] = w / "empty.jsonl"
    f["blank"] = jsonl(w / "blank.jsonl", [{"id": "a", "prompt": ""}])
    f["spaces"] = jsonl(w / "spaces.jsonl", [{"id": "a", "turns": ["   "]}])
    f["huge"] = jsonl(w / "huge.jsonl", [{"id": "big", "prompt": "lorem ipsum dolor " * 290_000}])  # ~5 MB
    f["long"] = jsonl(w / "long.jsonl", [{"id": "long", "turns": ["x" * 700]}])  # past the tiny model's 512 positions
    f["dupes"] = jsonl(w / "dupes.jsonl", [{"id": "a", "turns": ["one"]}, {"id": "a", "turns": ["two"]}])
    (w / "list.json").write_text("[1, 2, 3]")
    f["list"] = w / "list.json"
    (w / "truncated.jsonl").write_text('{"id": "a", "turns": ["one"]}\n{"id": "b", "tur')
    f["truncated"] = w / "truncated.jsonl"
    f["norows"] = jsonl(w / "norows.jsonl", [{"id": "a", "text": "no turns here"}])
    f["dir"] = w
    os.mkfifo(w / "fifo.jsonl")
    f["fifo"] = w / "fifo.jsonl"
    f["null_turn"] = jsonl(w / "null_turn.jsonl", [{"id": "a", "turns": ["Hello", None]}])
    f["comma"] = jsonl(w / "comma.jsonl", [{"id": "c1", "category": "q&a, short", "turns": ["Say yes"]},
                                           {"id": "c2", "category": "other", "turns": ["Say no"]}])
    f["formula"] = jsonl(w / "formula.jsonl", [{"id": "f1", "category": '=HYPERLINK("http://evil.example","x")', "turns": ["Say yes"]},
                                               {"id": "f2", "category": "+1+2", "turns": ["Say no"]},
                                               {"id": "f3", "category": "@SUM(A1)", "turns": ["Say so"]}])
    f["many"] = jsonl(w / "many.jsonl", [{"id": f"q{i}", "category": "ab"[i % 2], "turns": [f"Say {i} {i} {i} again and again"]} for i in range(12)])
    return f


# --- the cases ------------------------------------------------------------------------------------

def input_cases(s: Sweep, m: dict, w: dict, extra: dict) -> None:
    T = ["--target", m["target"]]
    run = ["run", *T, "--out", "{case}/out", "--max-new-tokens", 8, "--limit", 1]
    out = "{case}/out"
    # counts: one rule for every count flag of every command
    for flag in ("--limit", "--max-new-tokens", "--k", "--seed", "--tp"):
        for value in ((0, -5) if flag not in ("--seed", "--tp") else (-5,)) + ((10**12,) if flag != "--seed" else ()):
            if flag == "--seed" and value == 10**12:
                continue
            s.bad(f"run {flag} {value}", [*run, flag, value], flag)
    # 0 keeps the whole vocabulary (the CPU catalogue's trim of the bundled Hydra turned off); below it is refused
    s.bad("run --vocab-trim -1", ["run", *T, "--drafter", "draft-model", "--draft-model", m["draft"], "--vocab-trim", -1,
                                  "--vocab-trim-from", w["good"], "--out", out], "--vocab-trim")
    s.bad("run -o k=0", [*run, "-o", "k=0"], "--k")
    s.bad("run -o k=abc", [*run, "-o", "k=abc"], "option k takes int")
    s.bad("run -o k=2.5", [*run, "-o", "k=2.5"], "option k takes int")
    s.bad("run -o bogus=1", [*run, "-o", "bogus=1"], "does not take option(s) bogus")
    s.bad("run -o noequals", [*run, "-o", "noequals"], "key=value")
    s.bad("run --limit abc (click)", [*run, "--limit", "abc"], "--limit")
    s.bad("run --bogus flag (click)", [*run, "--bogus"], "--bogus")
    s.bad("unknown command (click)", ["benchmark"], "benchmark")
    for value in ("-1", "nan", "inf", "-inf"):
        s.bad(f"run --temperature {value}", [*run, "--temperature", value], "--temperature")
    s.bad("run --posterior-alpha nan", ["run", *T, "--drafter", "medusa", "--heads", "fresh", "--posterior-alpha", "nan", "--out", out],
          "--posterior-alpha")
    s.bad("run --device cuda (no GPU)", [*run, "--device", "cuda"], "CUDA")
    s.bad("run --device tpu", [*run, "--device", "tpu"], "device")
    s.bad("run --dtype int3", [*run, "--dtype", "int3"], "dtype")
    s.bad("run --engine warp", [*run, "--engine", "warp"], "engine")
    s.bad("run --backend vllm", [*run, "--backend", "vllm"], "backend")
    s.bad("run --tp 2 on hf", [*run, "--tp", 2], "--tp")
    s.bad("run --drafter nope", [*run, "--drafter", "nope"], "unknown drafter")
    s.bad("run --shard 3/2", [*run, "--shard", "3/2"], "--shard")
    s.bad("run --shard x", [*run, "--shard", "x"], "--shard")
    # models: missing, corrupt, pickled (with a payload that must never run), not a model
    for key, says in (("corrupt", "not a valid safetensors file"), ("truncated", "not a valid safetensors file"),
                      ("pickle", "never runs code"), ("notzip", "cannot read model"),
                      ("badconfig", "badconfig"), ("notmodel", "not a model transformers can load"), ("file", "just-a-file")):
        s.bad(f"run --target {key}", ["run", "--target", m[key], "--out", out, "--limit", 1], says, watch=(m[key],))
        s.bad(f"run --draft-model {key}", ["run", *T, "--drafter", "draft-model", "--draft-model", m[key], "--out", out, "--limit", 1],
              says, watch=(m[key],))
    s.bad("run --target ./missing", ["run", "--target", "./missing/model", "--out", out], "does not exist")
    s.bad("run --target hub id offline", ["run", "--target", "nobody/not-cached-model", "--out", out], "nobody/not-cached-model", limit_s=15)
    s.bad("run --heads corrupt .pt", ["run", *T, "--drafter", "medusa", "--heads", extra["heads_notzip"], "--out", out],
          "it is corrupt")
    s.bad("run --heads pickle with code", ["run", *T, "--drafter", "medusa", "--heads", extra["heads_pickle"], "--out", out], "never runs code")
    s.bad("run --heads corrupt .safetensors", ["run", *T, "--drafter", "hydra", "--heads", extra["heads_st"], "--out", out], "safetensors")
    s.bad("run --heads hub id offline", ["run", *T, "--drafter", "medusa", "--heads", "nobody/heads", "--out", out], "nobody/heads", limit_s=15)
    # trees
    medusa = ["run", *T, "--drafter", "medusa", "--heads", "fresh", "--out", out, "--limit", 1, "--max-new-tokens", 8]
    s.bad("run --tree chain:x: (rich emoji)", [*medusa, "--tree", "chain:x:"], "chain:x:")
    s.bad("run --tree [bold]x[/] (rich markup)", [*medusa, "--tree", "[bold]x[/]"], "[bold]x[/]")
    s.bad("run --tree chain:0", [*medusa, "--tree", "chain:0"], "chain:K")
    s.bad("run --tree empty file", [*medusa, "--tree", extra["tree_empty"]], "no paths")
    s.bad("run --tree 10,000 nodes", [*medusa, "--tree", extra["tree_big"]], "10000")
    s.bad("run --tree deep (more heads than given)", [*medusa, "--tree", extra["tree_deep"]], "deep")
    s.bad("run --tree not json", [*medusa, "--tree", extra["tree_bad"]], "not valid JSON")
    s.bad("run --tree a directory", [*medusa, "--tree", w["dir"]], "directory")
    s.bad("run --tree gaps in ranks", [*medusa, "--tree", extra["tree_gap"]], "without gaps")
    # workloads
    wl = ["run", *T, "--out", out, "--max-new-tokens", 8, "--workload"]
    s.bad("run --workload non-UTF-8", [*wl, w["latin1"]], "not UTF-8")
    s.bad("run --workload empty file", [*wl, w["empty"]], "no prompts")
    s.bad("run --workload empty prompt", [*wl, w["blank"]], "empty turn")
    s.bad("run --workload whitespace prompt", [*wl, w["spaces"]], "empty turn")
    s.bad("run --workload 5 MB prompt", [*wl, w["huge"]], "context window", limit_s=20)
    s.bad("run --workload prompt past the window", [*wl, w["long"]], "context window")
    s.bad("run --max-new-tokens past the window", [*run, "--max-new-tokens", 600], ("--max-new-tokens", "context window"))
    s.bad("run --workload duplicate ids", [*wl, w["dupes"]], "appears twice")
    s.bad("run --workload JSON list of numbers", [*wl, w["list"]], "JSON objects")
    s.bad("run --workload truncated line", [*wl, w["truncated"]], "truncated.jsonl:2")
    s.bad("run --workload rows without turns", [*wl, w["norows"]], "'turns' list or a 'prompt'")
    s.bad("run --workload a directory", [*wl, w["dir"]], "directory")
    s.bad("run --workload missing.jsonl", [*wl, "missing.jsonl"], "does not exist")
    s.bad("run --workload ''", [*wl, ""], "--workload")
    s.bad("run --workload /dev/zero", [*wl, "/dev/zero"], "not a regular file", limit_s=15)
    s.bad("run --workload a named pipe", [*wl, w["fifo"]], "not a regular file", limit_s=15)
    s.bad("run --workload a name of 5000 characters", [*wl, "w" * 5000 + ".jsonl"], "File name too long")
    s.bad("run --target a name of 5000 characters", ["run", "--target", "./" + "m" * 5000, "--out", out], "m" * 20)
    s.bad("run --categories nope", [*run, "--categories", "nope"], "unknown category")
    s.bad("run --categories ','", [*run, "--categories", ","], "--categories")
    s.bad("run --workload mt-bench offline", [*run, "--workload", "mt-bench"], "mt-bench", limit_s=15,
          env={"SPECBENCH_DATA": str(s.root / "no-data")})
    # output places, checked before any work
    s.bad("run --out a file", ["run", *T, "--out", w["good"], "--limit", 1], "is a file", watch=(w["good"],))
    s.bad("run --out under a file", ["run", *T, "--out", Path(w["good"]) / "sub", "--limit", 1], "is a file")
    s.bad("run --out unwritable (/proc)", ["run", *T, "--out", "/proc/specbench-out", "--limit", 1], "cannot write")
    s.bad("run --out a dangling symlink", ["run", *T, "--out", extra["dangling"], "--limit", 1], "does not exist")
    s.bad("run --out a name of 5000 characters", ["run", *T, "--out", "{case}/" + "o" * 5000, "--limit", 1], "File name too long")
    # resume
    rd = extra["run_dir"]
    s.bad("run --resume not a dir", ["run", "--resume", w["good"]], "not a directory", watch=(w["good"],))
    s.bad("run --resume not a run", ["run", "--resume", w["dir"]], "not a specbench run directory")
    s.bad("run --resume corrupt run.json", ["run", "--resume", extra["run_corrupt"]], "corrupt", watch=(extra["run_corrupt"],))
    s.bad("run --resume run.json edited (types)", ["run", "--resume", extra["run_edited"]], "corrupt", watch=(extra["run_edited"],))
    s.bad("run --resume schema_version 99", ["run", "--resume", extra["run_newer"]], "newer specbench", watch=(extra["run_newer"],))
    s.bad("run --resume with other flags", ["run", "--resume", rd, "--max-new-tokens", 4, "--drafter", "draft-model"],
          ("--max-new-tokens 4", "--drafter draft-model"), watch=(rd,))
    s.bad("run --resume with -o", ["run", "--resume", rd, "-o", "k=2"], "-o k=2", watch=(rd,))
    s.bad("run --resume with --out", ["run", "--resume", rd, "--out", out], "--out", watch=(rd,))
    s.bad("run --resume a simulated run", ["run", "--resume", extra["sim_run"]], "simulated", watch=(extra["sim_run"],))
    s.bad("run --resume while another process writes", ["run", "--resume", rd], "another specbench process", watch=(rd,), hold=rd)

    # record
    rec = ["record", *T, "--workload", w["good"], "--max-new-tokens", 8, "--profile-max-tokens", 4, "--profile-repeats", 1]
    log = extra["log"]
    for flag, value in (("--limit", 0), ("--limit", -5), ("--max-new-tokens", 0), ("--topk", 0), ("--topk", 10**12),
                        ("--profile-max-tokens", 0), ("--profile-repeats", -1)):
        s.bad(f"record {flag} {value}", [*rec, "--out", "{case}/log.jsonl", flag, value], flag)
    s.bad("record --topk past the vocabulary", [*rec, "--out", "{case}/log.jsonl", "--topk", 5000], "--topk")
    s.bad("record --out a directory", [*rec, "--out", w["dir"]], "is a directory", watch=(w["dir"],))
    s.bad("record --out unwritable", [*rec, "--out", "/proc/specbench.jsonl"], "cannot write")
    s.bad("record --out = its --workload", [*rec, "--out", w["good"]], "input", watch=(w["good"],))
    s.bad("record --out /dev/null", [*rec, "--out", "/dev/null"], "not a regular file")
    s.bad("record prompt past the window", ["record", *T, "--workload", w["long"], "--out", "{case}/log.jsonl"], "context window")
    s.bad("record --profile-max-tokens past the window", [*rec, "--out", log, "--profile-max-tokens", 600], "context window",
          watch=(log,))

    # profile
    prof = ["profile", *T, "--out", "{case}/p.json", "--repeats", 1, "--max-tokens", 4]
    s.bad("profile --context-tokens 100000", [*prof, "--context-tokens", 100000], ("--context-tokens", "context window"), limit_s=20)
    for flag, value in (("--context-tokens", 0), ("--max-tokens", 0), ("--repeats", 0), ("--max-tokens", -1)):
        s.bad(f"profile {flag} {value}", [*prof, flag, value], flag)
    s.bad("profile --out a directory", ["profile", *T, "--out", w["dir"]], "is a directory")

    # simulate
    sim = ["simulate", "--log", log, "--k", 2, "--out", out]
    for flag, value in (("--limit", 0), ("--max-new-tokens", 0), ("--latency-steps", 0), ("--limit", -5), ("--max-new-tokens", 10**12)):
        s.bad(f"simulate {flag} {value}", [*sim, flag, value], flag, watch=(log,))
    s.bad("simulate --k 0", ["simulate", "--log", log, "--k", 0, "--out", out], "--k")
    s.bad("simulate --k abc", ["simulate", "--log", log, "--k", "abc", "--out", out], "--k")
    s.bad("simulate no --k/--tree", ["simulate", "--log", log, "--out", out], "--k")
    s.bad("simulate -o k=3", [*sim, "-o", "k=3"], "--k and --tree")
    s.bad("simulate --tree empty file", ["simulate", "--log", log, "--tree", extra["tree_empty"], "--out", out], "no paths")
    s.bad("simulate --bandwidth nan", [*sim, "--bandwidth", "nan"], "--bandwidth")
    s.bad("simulate --bandwidth -1", [*sim, "--bandwidth", -1], "--bandwidth")
    s.bad("simulate --method bogus", [*sim, "--method", "bogus"], "--method")
    s.bad("simulate --profile not JSON", [*sim, "--profile", w["good"]], "not a verify-latency profile")
    s.bad("simulate --profile with NaN", [*sim, "--profile", extra["profile_nan"]], "positive numbers")
    s.bad("simulate --log DSD without --prompts", ["simulate", "--log", extra["dsd_log"], "--k", 2, "--out", out], "--prompts")
    s.bad("simulate --log missing", ["simulate", "--log", "{case}/none.jsonl", "--k", 2, "--out", out], "does not exist")
    s.bad("simulate --log a directory", ["simulate", "--log", w["dir"], "--k", 2, "--out", out], "directory")
    s.bad("simulate --log /dev/zero", ["simulate", "--log", "/dev/zero", "--k", 2, "--out", out], "not a regular file", limit_s=15)
    for key, says in (("log_v99", "newer specbench"), ("log_latin1", "not UTF-8"), ("log_truncated", "corrupt or truncated"),
                      ("log_headeronly", "no turns"), ("log_types", "wall_ms"), ("log_workload", "not a specbench target log"),
                      ("log_traversal", "hidden_file")):
        s.bad(f"simulate --log {key}", ["simulate", "--log", extra[key], "--k", 2, "--out", out], says, watch=(extra[key],))
    s.bad("simulate --out a file", [*sim[:-2], "--out", w["good"]], "is a file", watch=(w["good"],))
    s.bad("simulate --target another vocabulary", [*sim, "--target", extra["other_vocab"]], "token ids")

    # tune
    tune = ["tune", "--log", log, "--drafter", "prompt-lookup", "--draft-ms", 1, "--out", "{case}/tree.json"]
    for flag, value in (("--max-nodes", 0), ("--max-nodes", 10**12), ("--max-depth", 0), ("--latency-steps", 0), ("--limit", -1)):
        s.bad(f"tune {flag} {value}", [*tune, flag, value], flag, watch=(log,))
    for flag, value in (("--draft-ms", "nan"), ("--draft-ms", "inf"), ("--overhead-ms", -1)):
        s.bad(f"tune {flag} {value}", [*tune, flag, value], flag)
    s.bad("tune --k 3", [*tune, "--k", 3], "picks the tree")
    s.bad("tune --out = its --log", [*tune[:-2], "--out", log], "is also an input", watch=(log,))
    s.bad("tune --out a directory", [*tune[:-2], "--out", w["dir"]], "is a directory")
    s.bad("tune --plot frontier.txt", [*tune, "--plot", "{case}/frontier.txt"], "--plot")
    s.bad("tune --plot a directory", [*tune, "--plot", w["dir"]], "is a directory")
    s.bad("tune --profile not JSON", [*tune, "--profile", w["good"]], "not a verify-latency profile")
    s.bad("tune --profile with NaN", [*tune, "--profile", extra["profile_nan"]], "positive numbers")
    s.bad("tune --verify-log missing", [*tune, "--verify-log", "{case}/none.jsonl"], "does not exist")
    s.bad("tune --log /dev/zero", ["tune", "--log", "/dev/zero", "--drafter", "prompt-lookup", "--out", "{case}/t.json"],
          "not a regular file", limit_s=15)
    s.bad("tune --log truncated", ["tune", "--log", extra["log_truncated"], "--drafter", "prompt-lookup", "--out", "{case}/t.json"],
          "corrupt or truncated", watch=(extra["log_truncated"],))
    s.bad("tune --overhead-ms and --overhead-from", [*tune, "--overhead-ms", 1, "--overhead-from", w["dir"]], "not both")

    # convert-log
    conv = ["convert-log", "--log", extra["dsd_log"], "--prompts", extra["dsd_prompts"], "--target", m["target"]]
    s.bad("convert-log --out = its --prompts", [*conv, "--out", extra["dsd_prompts"]], "input", watch=(extra["dsd_prompts"],))
    s.bad("convert-log --out a directory", [*conv, "--out", w["dir"]], "directory")
    s.bad("convert-log more tensors than prompts", ["convert-log", "--log", extra["dsd_log"], "--prompts", extra["dsd_short"],
                                                    "--target", m["target"], "--out", "{case}/c.jsonl"], "matched by order")
    s.bad("convert-log no --target tokenizer", [*conv[:-2], "--target", m["notmodel"], "--out", "{case}/c.jsonl"], "tokenizer")

    # report
    rep = ["report", rd]
    s.bad("report no runs", ["report", w["dir"]], "no run directories")
    s.bad("report missing path", ["report", "{case}/nothing"], "does not exist")
    s.bad("report --by bogus", [*rep, "--by", "bogus"], "--by")
    s.bad("report --csv a directory", [*rep, "--csv", w["dir"]], "is a directory")
    s.bad("report --csv unwritable", [*rep, "--csv", "/proc/report.csv"], "cannot write")
    s.bad("report --csv /dev/full", [*rep, "--csv", "/dev/full"], "not a regular file")
    s.bad("report --csv over the run's records", [*rep, "--csv", Path(rd) / "prompts.jsonl"], "input", watch=(rd,))
    s.bad("report --html a directory", [*rep, "--html", w["dir"]], "is a directory")
    s.bad("report --plot a file", [*rep, "--plot", w["good"]], "is a file", watch=(w["good"],))
    s.bad("report --parquet under a file", [*rep, "--parquet", Path(w["good"]) / "x.parquet"], "is a file")
    s.bad("report a newer-schema run only", ["report", extra["run_newer"]], "newer specbench")

    # export-answers
    s.bad("export-answers --out a directory", ["export-answers", rd, "--out", w["dir"]], "is a directory")
    s.bad("export-answers --out over the run's records", ["export-answers", rd, "--out", Path(rd) / "prompts.jsonl"], "input",
          watch=(rd,))
    s.bad("export-answers --mode bogus", ["export-answers", rd, "--out", "{case}/a.jsonl", "--mode", "bogus"], "--mode")
    s.bad("export-answers not a run", ["export-answers", w["good"], "--out", "{case}/a.jsonl"], "not a directory")

    # vocab-trim build
    vt = ["vocab-trim", "build", "--from", w["good"], "--target", m["target"]]
    for value in (0, -5, 10**12):
        s.bad(f"vocab-trim build --top {value}", [*vt, "--out", "{case}/ids.json", "--top", value], "--top")
    s.bad("vocab-trim build --out a directory", [*vt, "--out", w["dir"]], "is a directory")
    s.bad("vocab-trim build --out = --from", ["vocab-trim", "build", "--from", log, "--target", m["target"], "--out", log], "input",
          watch=(log,))
    s.bad("vocab-trim build --from non-UTF-8", ["vocab-trim", "build", "--from", w["latin1"], "--target", m["target"],
                                                "--out", "{case}/ids.json"], "not UTF-8")
    s.bad("run --vocab-trim-from hand-edited ids", ["run", *T, "--drafter", "draft-model", "--draft-model", m["draft"],
                                                     "--vocab-trim", 4, "--vocab-trim-from", extra["ids_bad"], "--out", out], "ids")

    # train-data and train
    td = ["train-data", *T, "--out", "{case}/data", "--max-new-tokens", 8]
    for flag, value in (("--limit", 0), ("--limit", -5), ("--max-new-tokens", 0), ("--batch-size", 0)):
        s.bad(f"train-data {flag} {value}", [*td, flag, value], flag)
    s.bad("train-data --temperature nan", [*td, "--temperature", "nan"], "--temperature")
    s.bad("train-data --out a file", ["train-data", *T, "--out", w["good"]], "is a file", watch=(w["good"],))
    s.bad("train-data --out not empty", ["train-data", *T, "--out", w["dir"]], "not empty", watch=(w["dir"],))
    tr = ["train", "--drafter", "medusa", *T, "--data", extra["data"], "--out", "{case}/ckpt", "--steps", 1]
    for flag, value in (("--steps", 0), ("--batch-tokens", -1), ("--max-length", 0), ("--eval-every", 0), ("--warmup-steps", -1),
                        ("--num-heads", 0)):
        s.bad(f"train {flag} {value}", [*tr, flag, value], flag)
    for flag, value in (("--lr", "nan"), ("--lr", -1), ("--min-lr-ratio", 2), ("--eval-fraction", 0)):
        s.bad(f"train {flag} {value}", [*tr, flag, value], flag)
    s.bad("train --data missing", [*tr[:-4], "--data", "{case}/none", "--out", "{case}/ckpt"], "not a training data directory")
    s.bad("train --data corrupt tokens", [*tr[:-4], "--data", extra["data_corrupt"], "--out", "{case}/ckpt"], "safetensors")
    s.bad("train --drafter eagle3 on a 2-layer target", ["train", "--drafter", "eagle3", *T, "--data", extra["data"], "--out",
                                                          "{case}/ckpt"], "too few for EAGLE-3")
    s.bad("train --out a file", [*tr[:-4], "--out", w["good"]], "is a file", watch=(w["good"],))

    # a pickle payload ran: the worst finding there is (after every case that loads the pickled checkpoints)
    s.check("pickled payload never ran", lambda: [f"{m['pwned']} exists"] if m["pwned"].exists() else [])


def good_cases(s: Sweep, m: dict, w: dict, extra: dict) -> None:
    T = ["--target", m["target"], "--max-new-tokens", 8]

    def run_dir_count(parent: Path, n: int = 1):
        return lambda out, err: None if len([p for p in Path(parent).iterdir() if (p / "run.json").exists()]) == n else "no run directory"

    for key, fmt in (("fastchat", "FastChat question.jsonl"), ("specbench", "Spec-Bench question.jsonl"),
                     ("dsd", "DSD prompts JSONL"), ("hellaswag", "HellaSwag"), ("bom", "JSONL")):
        s.good(f"run --workload {key} (as published)", ["run", *T, "--workload", w[key], "--out", "{case}/out", "--json"],
               lambda out, err, fmt=fmt: None if fmt in err else f"format not named as {fmt}")
    spaced = s.root / "dir with spaces ünïcødé"
    s.good("run --out with spaces and unicode", ["run", *T, "--limit", 1, "--out", spaced, "--json"], run_dir_count(spaced))
    s.good("run --out a symlink to a directory", ["run", *T, "--limit", 1, "--out", extra["out_link"], "--json"],
           run_dir_count(extra["out_link_target"]))
    s.good("run --categories a task of Spec-Bench", ["run", *T, "--workload", w["specbench"], "--categories", "translation",
                                                    "--out", "{case}/out", "--json"])
    s.good("simulate --target another model, same vocabulary (warns)", ["simulate", "--log", extra["log"], "--k", 2,
                                                                         "--target", m["other"], "--out", "{case}/out"],
           lambda out, err: None if "warning:" in err and "recorded by" in err else "no warning naming both targets")
    s.good("report a run written twice over (warns)", ["report", extra["run_doubled"]],
           lambda out, err: None if "duplicate" in err else "no duplicate warning")
    s.good("report an unfinished run (says so)", ["report", extra["run_unfinished"]],
           lambda out, err: None if "unfinished" in err and "UNFINISHED" in out else "unfinished not said")
    s.good("report --csv through a symlink", ["report", extra["run_dir"], "--csv", extra["csv_link"]],
           lambda out, err: None if Path(extra["csv_link"]).resolve().is_file() and Path(extra["csv_link"]).is_symlink() else "symlink replaced")


@contextlib.contextmanager
def held_lock(output: Path):
    """Hold an output's write lock as another specbench process would (a flock belongs to an open
    file, so this process's own commands are refused as another process's would be)."""
    import fcntl

    from specbench.files import write_lock

    if (Path(output) / "run.json").is_file():
        fd = os.open(Path(output) / ".lock", os.O_RDWR | os.O_CREAT)  # RunStore's lock file (specbench/store.py)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(fd)
    else:
        with write_lock(output):
            yield


def prepare(s: Sweep, m: dict, w: dict) -> dict:
    """Run directories, logs and files the cases need, made through the CLI itself."""
    root, extra = s.root / "made", {}
    root.mkdir()
    code, out, err, _ = invoke(["run", "--target", m["target"], "--workload", w["good"], "--max-new-tokens", 8, "--out", root / "runs", "--json"])
    assert code == 0, err
    run_dir = Path(json.loads(out)["run"])
    extra["run_dir"] = run_dir

    def variant(name: str, edit) -> Path:
        d = root / name
        shutil.copytree(run_dir, d)
        info = json.loads((d / "run.json").read_text())
        edit(d, info)
        return d

    extra["run_corrupt"] = variant("run_corrupt", lambda d, i: (d / "run.json").write_text('{"run_id": "x", "target": '))
    extra["run_edited"] = variant("run_edited", lambda d, i: (d / "run.json").write_text(json.dumps({**i, "decode": "fast please"})))
    extra["run_newer"] = variant("run_newer", lambda d, i: (d / "run.json").write_text(json.dumps({**i, "schema_version": 99})))

    def doubled(d, i):
        for name in ("prompts.jsonl", "steps.jsonl"):
            text = (d / name).read_text()
            (d / name).write_text(text + text)
    extra["run_doubled"] = variant("run_doubled", doubled)

    def unfinished(d, i):
        turns = [json.loads(line) for line in (d / "prompts.jsonl").read_text().splitlines()]
        first = turns[0]["prompt_id"]
        (d / "prompts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in turns if t["prompt_id"] == first))
        i["finished"] = None
        (d / "run.json").write_text(json.dumps(i))
    extra["run_unfinished"] = variant("run_unfinished", unfinished)

    log = root / "log.jsonl"
    code, _, err, _ = invoke(["record", "--target", m["target"], "--workload", w["good"], "--max-new-tokens", 8, "--out", log,
                              "--profile-max-tokens", 4, "--profile-repeats", 1])
    assert code == 0, err
    extra["log"] = log
    code, out, err, _ = invoke(["simulate", "--log", log, "--k", 2, "--out", root / "sims", "--json"])
    assert code == 0, err
    extra["sim_run"] = Path(json.loads(out)["results"][0]["run"])
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])

    def log_variant(name: str, text: str | bytes) -> Path:
        path = root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    extra["log_v99"] = log_variant("v99.jsonl", "\n".join([json.dumps({**header, "version": 99}), *lines[1:]]) + "\n")
    extra["log_latin1"] = log_variant("latin1.jsonl", log.read_bytes()[:40] + b"\xe9\xff" + log.read_bytes()[40:])
    extra["log_truncated"] = log_variant("truncated.jsonl", log.read_text()[:-40])
    extra["log_headeronly"] = log_variant("headeronly.jsonl", lines[0] + "\n")
    turn = json.loads(lines[-1])
    extra["log_types"] = log_variant("types.jsonl", "\n".join([*lines[:-1], json.dumps({**turn, "wall_ms": "fast"})]) + "\n")
    extra["log_workload"] = w["good"]
    extra["log_traversal"] = log_variant("traversal.jsonl", "\n".join([json.dumps({**header, "hidden_file": "../../etc/passwd"}), *lines[1:]]) + "\n")
    extra["profile_nan"] = log_variant("nan.json", '{"context_tokens": 16, "ms": [1.0, NaN]}')

    # DSD: text dumps of the target's continuations and the prompts, matched by order
    extra["dsd_prompts"] = jsonl(root / "dsd_prompts.jsonl", [{"prompt": "[header] How to [title] x"}, {"prompt": "A man. he"}])
    extra["dsd_short"] = jsonl(root / "dsd_short.jsonl", [{"prompt": "only one"}])
    extra["dsd_log"] = log_variant("dsd.txt", "tensor([[40, 41, 42,\n         43]])\ntensor([[44, 45]])\n")

    # trees
    extra["tree_empty"] = log_variant("empty_tree.json", "[]")
    extra["tree_big"] = log_variant("big_tree.json", json.dumps([[i] for i in range(100)] + [[i, j] for i in range(99) for j in range(100)]))
    extra["tree_deep"] = log_variant("deep_tree.json", json.dumps([[0] * d for d in range(1, 9)]))
    extra["tree_bad"] = log_variant("bad_tree.json", "[[0], [1")
    extra["tree_gap"] = log_variant("gap_tree.json", "[[0], [2]]")

    # heads files: not a torch file, a pickle with a payload, a corrupt safetensors
    heads = root / "heads"
    for name, files in (("notzip", {"medusa_lm_head.pt": b"garbage"}),
                        ("pickle", {"medusa_lm_head.pt": (m["pickle"] / "pytorch_model.bin").read_bytes()}),
                        ("st", {"hydra_lm_head.safetensors": os.urandom(64)})):
        d = heads / name
        d.mkdir(parents=True)
        for f, data in files.items():
            (d / f).write_bytes(data)
        extra[f"heads_{name}"] = d
    extra["ids_bad"] = log_variant("ids.json", json.dumps({"format": "specbench-vocab-trim/1", "vocab_size": 100, "ids": [1, 1, -4, "x"]}))
    extra["dangling"] = root / "dangling-link"
    extra["dangling"].symlink_to(root / "nowhere")
    extra["out_link_target"] = root / "real-out"
    extra["out_link_target"].mkdir()
    extra["out_link"] = root / "out-link"
    extra["out_link"].symlink_to(extra["out_link_target"])
    (root / "csv-target.csv").write_text("old")
    extra["csv_link"] = root / "csv-link.csv"
    extra["csv_link"].symlink_to(root / "csv-target.csv")

    # another vocabulary size, for simulate --target
    from tiny import char_tokenizer, tiny_llama

    other = tiny_llama(1, vocab=120)
    other.save_pretrained(root / "other-vocab")
    char_tokenizer().save_pretrained(root / "other-vocab")
    extra["other_vocab"] = root / "other-vocab"

    # run directories whose records are a pipe, a device or cut short; a run of formula-looking categories
    extra["run_fifo"] = variant("run_fifo", lambda d, i: ((d / "steps.jsonl").unlink(), os.mkfifo(d / "steps.jsonl")))
    extra["run_zero"] = variant("run_zero", lambda d, i: ((d / "steps.jsonl").unlink(), (d / "steps.jsonl").symlink_to("/dev/zero")))

    def cut(d, i):
        data = (d / "steps.jsonl").read_bytes()
        (d / "steps.jsonl").write_bytes(data[: int(len(data) * 0.6)])
    extra["run_truncated"] = variant("run_truncated", cut)
    code, out, err, _ = invoke(["run", "--target", m["target"], "--workload", w["formula"], "--max-new-tokens", 4, "--out",
                                root / "formula", "--json"])
    assert code == 0, err
    extra["run_formula"] = Path(json.loads(out)["run"])

    def foreign(d, i):  # one prompt of another run (its steps and turns) copied in
        for name in ("steps.jsonl", "prompts.jsonl"):
            rows = [x for x in (extra["run_formula"] / name).read_text().splitlines() if json.loads(x)["prompt_id"] == "f1"]
            with open(d / name, "a") as f:
                f.write("\n".join(rows) + "\n")
    extra["run_foreign"] = variant("run_foreign", foreign)
    extra["tree_siblings"] = log_variant("siblings_tree.json", json.dumps([[i] for i in range(49_153)]))
    extra["tree_wide"] = log_variant("wide_tree.json", json.dumps([[i] for i in range(150)]))  # the tiny vocabulary has 100 tokens

    # training data (tiny) and a corrupt copy
    code, _, err, _ = invoke(["train-data", "--target", m["target"], "--workload", w["good"], "--max-new-tokens", 8, "--out", root / "data"])
    assert code == 0, err
    extra["data"] = root / "data"
    shutil.copytree(root / "data", root / "data_corrupt")
    (root / "data_corrupt" / "tokens.safetensors").write_bytes(os.urandom(100))
    extra["data_corrupt"] = root / "data_corrupt"
    code, _, err, _ = invoke(["train", "--drafter", "medusa", "--target", m["target"], "--data", root / "data", "--out", root / "ckpt",
                              "--steps", 1, "--num-heads", 2])
    assert code == 0, err
    extra["ckpt"] = root / "ckpt"
    return extra


def issue28_cases(s: Sweep, m: dict, w: dict, extra: dict) -> None:
    """Data directories and run directories under odd files, sizes and outputs that meet (issue 28)."""
    T = ["--target", m["target"]]
    rd, log, data = extra["run_dir"], extra["log"], extra["data"]
    run = ["run", *T, "--out", "{case}/out", "--max-new-tokens", 8, "--limit", 1]
    medusa = ["run", *T, "--drafter", "medusa", "--heads", "fresh", "--out", "{case}/out", "--limit", 1, "--max-new-tokens", 8]
    # sizes, checked before anything is built
    s.bad("run --temperature 1e-40", [*run, "--temperature", "1e-40"], ("--temperature", "use 0 for greedy"))
    s.bad("train-data --temperature 1e-40", ["train-data", *T, "--out", "{case}/data", "--temperature", "1e-40"], "--temperature")
    s.bad("run --tree chain:1000000", [*medusa, "--tree", "chain:1000000"], ("chain:1000000", "at most"), limit_s=20)
    s.bad("simulate --drafter medusa, a 49,153-sibling tree", ["simulate", "--log", log, "--drafter", "medusa", "--tree",
                                                               extra["tree_siblings"], "--out", "{case}/out"], "at most", limit_s=30)
    s.bad("run --tree more siblings than the vocabulary", [*medusa, "--tree", extra["tree_wide"]], "siblings")
    # outputs that meet each other or an input
    s.bad("report --csv X --html X", ["report", rd, "--csv", "{case}/x", "--html", "{case}/x"], ("--csv", "--html"))
    s.bad("tune --out X.png --plot X.png", ["tune", "--log", log, "--drafter", "prompt-lookup", "--draft-ms", 1, "--out", "{case}/x.png",
                                             "--plot", "{case}/x.png"], ("--out and --plot both name",))
    s.bad("report --csv X --parquet X", ["report", rd, "--csv", "{case}/x.out", "--parquet", "{case}/x.out"], "both name")
    s.bad("train-data --out over its own --workload", ["train-data", *T, "--workload", Path(data) / "conversations.jsonl",
                                                       "--out", data, "--overwrite"], "overlap", watch=(data,))
    s.bad("train --out the folder holding its --data, --overwrite", ["train", "--drafter", "medusa", *T, "--data", data, "--out",
                                                                     Path(data).parent, "--overwrite"], "overlap", watch=(data,))
    s.bad("train --out = its --data, --overwrite", ["train", "--drafter", "medusa", *T, "--data", data, "--out", data, "--overwrite"],
          "overlap", watch=(data,))
    # workloads: a null turn is not the text "None"; a category with a comma is selectable by its name
    s.bad("run --workload a null turn", ["run", *T, "--out", "{case}/out", "--workload", w["null_turn"]], ("turn 2", "null"))
    s.good("run --categories a category with a comma", ["run", *T, "--max-new-tokens", 4, "--workload", w["comma"],
                                                        "--categories", "q&a, short", "--out", "{case}/out", "--json"],
           lambda out, err: None if records(Path(json.loads(out)["run"]))[0][0]["prompt_id"] == "c1"
           and len(records(Path(json.loads(out)["run"]))[0]) == 2 else "not the one prompt of that category")
    # run directories whose records are a pipe or a device: refused in one line, never a hang or a MemoryError
    for key, what in (("run_fifo", "a named pipe"), ("run_zero", "a symlink to /dev/zero")):
        d = extra[key]
        s.bad(f"report, steps.jsonl {what}", ["report", d], "not a regular file", limit_s=15)
        s.bad(f"run --resume, steps.jsonl {what}", ["run", "--resume", d], "not a regular file", limit_s=15)
        s.bad(f"tune --overhead-from, steps.jsonl {what}", ["tune", "--log", log, "--drafter", "prompt-lookup", "--overhead-from", d,
                                                            "--out", "{case}/t.json"], "not a regular file", limit_s=15)
        s.bad(f"vocab-trim build --from, steps.jsonl {what}", ["vocab-trim", "build", "--from", d, "--target", m["target"],
                                                               "--out", "{case}/ids.json"], "not a regular file", limit_s=15)
    # a record copied in from another run: refused (by the run id every record carries), never counted
    s.bad("report, records copied in from another run", ["report", extra["run_foreign"]], ("a record of run", "remove them"),
          watch=(extra["run_foreign"],))
    s.bad("run --resume, records copied in from another run", ["run", "--resume", extra["run_foreign"]], "a record of run",
          watch=(extra["run_foreign"],))
    # what report counts
    s.good("report R R parent counts the run once", ["report", rd, rd, Path(rd).parent],
           lambda out, err: None if "runs merged" not in out and "duplicate" not in err and "more than one run" not in err
           else "one run counted more than once")
    s.good("report a truncated steps.jsonl (says so, averages nothing)", ["report", extra["run_truncated"]],
           lambda out, err: None if "truncated" in err and "lost" in err and "--resume" in err else "the truncation is not said")
    s.check("run --resume repairs a truncated steps.jsonl", lambda: resume_repairs(s.root / "repair", extra))
    s.check("report --csv neutralises formula cells", lambda: csv_is_inert(s.root / "formula-csv", extra["run_formula"]))
    s.check("report --html leaves no plot folder behind", lambda: html_leaves_nothing(s.root / "html-tmp", rd))
    s.check("train-data --overwrite --no-cache-hidden drops the old hidden states",
            lambda: overwrite_drops_hidden(s.root / "data-overwrite", m, w, data))
    s.check("a full disk as record --hidden writes its side file", lambda: full_disk(s.root / "full-record", [
        "record", *T, "--workload", w["good"], "--max-new-tokens", 8, "--hidden", "--no-profile", "--out", "{dir}/log.jsonl"]))
    s.check("a full disk as train-data writes its tensors", lambda: full_disk(s.root / "full-data", [
        "train-data", *T, "--workload", w["good"], "--max-new-tokens", 8, "--out", "{dir}/data"]))
    # a second writer of every output is refused in one line before it writes anything (the first holds the lock)
    busy = "another specbench process"
    second_writers = {
        "profile --out": ["profile", *T, "--out", "{case}/x", "--repeats", 1, "--max-tokens", 2, "--context-tokens", 8],
        "export-answers --out": ["export-answers", rd, "--out", "{case}/x"],
        "vocab-trim build --out": ["vocab-trim", "build", "--from", w["good"], "--target", m["target"], "--out", "{case}/x"],
        "convert-log --out": ["convert-log", "--log", extra["dsd_log"], "--prompts", extra["dsd_prompts"], *T, "--out", "{case}/x"],
        "tune --out": ["tune", "--log", log, "--drafter", "prompt-lookup", "--draft-ms", 1, "--out", "{case}/x"],
        "record --out": ["record", *T, "--workload", w["good"], "--max-new-tokens", 4, "--no-profile", "--out", "{case}/x"],
        "report --csv": ["report", rd, "--csv", "{case}/x"],
        "report --html": ["report", rd, "--html", "{case}/x"],
        "train-data --out": ["train-data", *T, "--workload", w["good"], "--max-new-tokens", 4, "--out", "{case}/x"],
        "train --out": ["train", "--drafter", "medusa", *T, "--data", data, "--out", "{case}/x", "--steps", 1],
    }
    for what, argv in second_writers.items():
        s.bad(f"{what} while another process writes it", argv, (busy, "x"), hold="{case}/x")


def resume_repairs(root: Path, extra: dict) -> list[str]:
    shutil.copytree(extra["run_truncated"], root)
    code, _, err, _ = invoke(["run", "--resume", root, "--json"])
    if code:
        return [f"resume exit {code}: {err[-400:]}"]
    code, out, err, _ = invoke(["report", root])
    problems = [] if code == 0 and "truncated" not in err else [f"report after resume: exit {code}: {err[-400:]}"]
    return problems + compare(root, extra["run_dir"])


def csv_is_inert(root: Path, run_dir: Path) -> list[str]:
    import csv

    root.mkdir()
    code, _, err, _ = invoke(["report", run_dir, "--by", "category", "--csv", root / "r.csv"])
    if code:
        return [f"exit {code}: {err[-400:]}"]
    cells = [cell for row in csv.reader(io.StringIO((root / "r.csv").read_text())) for cell in row]
    live = [cell for cell in cells if cell[:1] in ("=", "+", "@")]
    return [f"formula cells: {live}"] if live or not any("HYPERLINK" in c for c in cells) else []


def html_leaves_nothing(root: Path, run_dir: Path) -> list[str]:
    (root / "tmp").mkdir(parents=True)
    code, _, err, _ = invoke(["report", run_dir, "--html", root / "r.html"], env={"TMPDIR": str(root / "tmp")})
    import tempfile

    tempfile.tempdir = None  # the module caches $TMPDIR: forget the case's
    left = sorted(p.name for p in (root / "tmp").iterdir()) + sorted(p.name for p in root.iterdir() if p.name not in ("tmp", "r.html"))
    return ([f"exit {code}: {err[-400:]}"] if code else []) + ([f"left {left}"] if left else [])


def overwrite_drops_hidden(root: Path, m: dict, w: dict, data: Path) -> list[str]:
    shutil.copytree(data, root)
    if not (root / "hidden.safetensors").is_file():
        return ["the fixture data has no hidden states"]
    code, _, err, _ = invoke(["train-data", "--target", m["target"], "--workload", w["many"], "--max-new-tokens", 6, "--out", root,
                              "--overwrite", "--no-cache-hidden"])
    if code:
        return [f"exit {code}: {err[-400:]}"]
    from specbench.train.data import load_data

    loaded = load_data(root)
    problems = ["hidden.safetensors of the old data is still there"] if (root / "hidden.safetensors").exists() else []
    return problems + (["load_data returns the old hidden states"] if loaded.hidden is not None else [])


def full_disk(root: Path, argv: list) -> list[str]:
    """A command whose safetensors write meets a full disk (as safetensors reports it): one line, nothing left."""
    import safetensors.torch

    root.mkdir()
    real = safetensors.torch.save_file

    def no_space(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    safetensors.torch.save_file = no_space
    try:
        code, _, err, _ = invoke([str(a).replace("{dir}", str(root)) for a in argv])
    finally:
        safetensors.torch.save_file = real
    left = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    lines = [x for x in err.splitlines() if x.strip()]
    problems = [] if code == 2 and len(lines) == 1 and "No space left" in err and "Traceback" not in err else [f"exit {code}: {err[-600:]}"]
    return problems + ([f"left {left}"] if left else [])


# --- faults: real processes killed at fixed points ---------------------------------------------------

def run_dir_of(out_dir: Path) -> Path | None:
    dirs = [d for d in out_dir.glob("*") if d.is_dir()] if out_dir.exists() else []
    return dirs[0] if dirs else None


def records(run_dir: Path) -> tuple[list, list]:
    turns = [json.loads(x) for x in (run_dir / "prompts.jsonl").read_text().splitlines() if x.strip()]
    steps = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines() if x.strip()]
    return turns, steps


def compare(run_dir: Path, reference: Path) -> list[str]:
    """Problems with a resumed run against an uninterrupted one: duplicates, missing prompts, other outputs."""
    turns, steps = records(run_dir)
    ref_turns, ref_steps = records(reference)
    problems = []
    keys = Counter((t["prompt_id"], t["turn"], t["mode"]) for t in turns)
    if keys and max(keys.values()) > 1:
        problems.append("a prompt measured twice")
    if set(keys) != {(t["prompt_id"], t["turn"], t["mode"]) for t in ref_turns}:
        problems.append("other prompts than an uninterrupted run")
    if {(t["prompt_id"], t["mode"]): t["output_ids"] for t in turns} != {(t["prompt_id"], t["mode"]): t["output_ids"] for t in ref_turns}:
        problems.append("other outputs than an uninterrupted run")
    step_keys = Counter((x["prompt_id"], x["turn"], x["mode"], x["step"]) for x in steps)
    if step_keys and max(step_keys.values()) > 1:
        problems.append("a step recorded twice")
    if set(step_keys) != {(x["prompt_id"], x["turn"], x["mode"], x["step"]) for x in ref_steps}:
        problems.append("other steps than an uninterrupted run")
    if not json.loads((run_dir / "run.json").read_text()).get("finished"):
        problems.append("not marked finished")
    return problems


def one_error_line(err: str) -> list[str]:
    """A fault ends in one error line (a progress note before it, like the line naming the workload, is fine)."""
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    last = [x for x in err.splitlines() if x.strip()][-1:]
    ok = len(errors) == 1 and last == errors and "Traceback" not in err
    return [] if ok else [f"not one error line: {err.strip()[-600:]}"]


FAULTS = [
    "SIGKILL of run after its 3rd prompt, then --resume",
    "SIGKILL of run between a prompt's steps and its turns, then --resume",
    "SIGINT of run after its 2nd prompt, then --resume",
    "SIGINT while the target loads",
    "SIGKILL of record mid-recording, over an existing log",
    "SIGKILL of record between its side file and its log, over an existing log",
    "SIGINT of record mid-recording, over an existing log",
    "a complete record replaces the log, its side file and its profile together",
    "a full disk as record commits over an existing log",
    "two --resume processes on one run directory",
]


def faults(root: Path, m: dict, w: dict) -> dict[str, list[str]]:
    """Kills at fixed points (tests/faults.py: a wrapped function signals its own process on its n-th call).
    The processes of one round run side by side; each round's outcome is checked after it.
    Returns the problems of each fault by name (FAULTS lists the names)."""
    from faults import HoldAt, KillAt, spawn

    results: dict[str, list[str]] = {}

    def fault(name: str, problems: list[str], lost=()) -> None:
        results[name] = list(problems)

    root.mkdir()
    base = ["run", "--target", m["target"], "--workload", w["many"], "--max-new-tokens", 24, "--drafter", "prompt-lookup", "--json"]
    code, out, err, _ = invoke([*base, "--out", root / "straight"])
    assert code == 0, err
    reference = Path(json.loads(out)["run"])

    # round 1: run killed at four points, record over an existing log killed at three
    log_root = root / "logs"
    log_root.mkdir()
    rec_args = ["record", "--target", m["target"], "--workload", w["good"], "--max-new-tokens", 8, "--hidden",
                "--profile-max-tokens", 4, "--profile-repeats", 1]
    code, _, err, _ = invoke([*rec_args, "--out", log_root / "original.jsonl"])
    assert code == 0, err
    runs = {
        "SIGKILL of run after its 3rd prompt": (KillAt("specbench.store:RunStore.append_prompt", 3, "SIGKILL", "after"), "resume"),
        "SIGKILL of run between a prompt's steps and its turns": (KillAt("specbench.store:RunStore._append", 6, "SIGKILL"), "resume"),
        "SIGINT of run after its 2nd prompt": (KillAt("specbench.store:RunStore.append_prompt", 2, "SIGINT", "after"), "resume"),
        "SIGINT while the target loads": (KillAt("specbench.runner:load_target", 1, "SIGINT"), "nothing"),
    }
    records_ = {
        "SIGKILL of record mid-recording": KillAt("specbench.simulate.record:decode", 3, "SIGKILL"),
        "SIGKILL of record between its side file and its log": KillAt("specbench.simulate.log:atomic_write_text", 1, "SIGKILL"),
        "SIGINT of record mid-recording": KillAt("specbench.simulate.record:decode", 3, "SIGINT"),
    }
    procs = {}
    for i, (name, (kill, _)) in enumerate(runs.items()):
        procs[name] = spawn([*base, "--out", root / f"run{i}"], root, kill)
    originals = {}
    for i, (name, kill) in enumerate(records_.items()):
        d = log_root / f"rec{i}"
        d.mkdir()
        shutil.copy(log_root / "original.jsonl", d / "log.jsonl")
        side = json.loads((d / "log.jsonl").read_text().splitlines()[0])["hidden_file"]
        shutil.copy(log_root / side, d / side)
        originals[name] = {p: p.read_bytes() for p in (d / "log.jsonl", d / side)}
        procs[name] = spawn([*rec_args, "--out", d / "log.jsonl"], root, kill)
    results = {name: (proc, *proc.communicate(timeout=600)) for name, proc in procs.items()}

    for i, (name, (kill, after)) in enumerate(runs.items()):
        proc, _, err = results[name]
        out_dir = root / f"run{i}"
        problems = []
        if kill.signal == "SIGKILL":
            problems += [] if proc.returncode == -signal.SIGKILL else [f"exit {proc.returncode}: {err.strip()[-300:]}"]
        else:
            problems += one_error_line(err) + ([] if proc.returncode in (2, 130) else [f"exit {proc.returncode}"])
        run_dir = run_dir_of(out_dir)
        if after == "nothing":
            problems += [f"left {run_dir} behind"] if run_dir else []
        elif run_dir is None:
            problems.append("no run directory to resume")
        else:
            if kill.signal == "SIGINT" and "--resume" not in err:
                problems.append("the message does not name --resume")
            with open(run_dir / "steps.jsonl", "a") as f:  # and a half-written line, as a kill mid-write leaves
                f.write('{"draft_ms": 0.1, "verify_')
            code, _, err, _ = invoke(["run", "--resume", run_dir, "--json"])
            problems += [f"resume exit {code}: {err.strip()[-300:]}"] if code else compare(run_dir, reference)
        fault(name + ("" if after == "nothing" else ", then --resume"), problems,
                lost=[f"{name}: {p}" for p in problems if "twice" in p or "other" in p])

    for name, kill in records_.items():
        proc, _, err = results[name]
        changed = [p.name for p, data in originals[name].items() if not p.exists() or p.read_bytes() != data]
        problems = [f"{changed} changed"] if changed else []
        if kill.signal == "SIGKILL":
            problems += [] if proc.returncode == -signal.SIGKILL else [f"exit {proc.returncode}"]
        else:
            problems += one_error_line(err) + ([] if "as it was" in err else [f"the message does not say the log is kept: {err[-200:]}"])
            leftovers = [p.name for p in next(iter(originals[name])).parent.iterdir() if p not in originals[name]]
            problems += [f"left {leftovers}"] if leftovers else []
        log = next(iter(originals[name]))
        code, _, err, _ = invoke(["simulate", "--log", log, "--k", 2, "--out", log.parent / "sims"])
        problems += [] if code == 0 else [f"the old log no longer simulates: {err[-200:]}"]
        fault(name + ", over an existing log", problems, lost=[f"{name}: {c}" for c in changed])

    # a complete record over the log a kill left a stray side file beside: log, side file and profile
    # are replaced together, the old side file and the stray are gone
    log = log_root / "rec1" / "log.jsonl"
    old_side = log.parent / json.loads(log.read_text().splitlines()[0])["hidden_file"]
    code, _, err, _ = invoke([*rec_args, "--out", log])
    side = log.parent / json.loads(log.read_text().splitlines()[0])["hidden_file"]
    others = sorted(p.name for p in log.parent.glob("*.safetensors") if p != side)
    problems = [] if code == 0 and side.is_file() and not old_side.exists() and '"type": "profile"' in log.read_text() \
        else [f"re-record: {err[-300:]}"]
    problems += [f"left {others}"] if others else []
    fault("a complete record replaces the log, its side file and its profile together", problems)

    # a full disk as record commits over an existing log: one line, the old log and side file as they were
    import specbench.files as files

    (log_root / "full").mkdir()
    log = log_root / "full" / "log.jsonl"
    shutil.copy(log_root / "original.jsonl", log)
    side = json.loads(log.read_text().splitlines()[0])["hidden_file"]
    shutil.copy(log_root / side, log.parent / side)
    kept = {p: p.read_bytes() for p in (log, log.parent / side)}
    real_replace = files.os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".jsonl"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    files.os.replace = full_disk
    try:
        code, _, err, _ = invoke([*rec_args, "--out", log])
    finally:
        files.os.replace = real_replace
    changed = [p.name for p, data in kept.items() if p.read_bytes() != data]
    leftovers = [p.name for p in log.parent.iterdir() if p not in kept]
    problems = ([f"{changed} changed"] if changed else []) + ([f"left {leftovers}"] if leftovers else [])
    problems += one_error_line(err) + ([] if code == 2 and "No space left" in err else [f"exit {code}"])
    fault("a full disk as record commits over an existing log", problems, lost=changed)

    # round 2: two --resume processes on one run directory: the second refused while the first measures
    out_dir = root / "concurrent"
    partial = spawn([*base, "--out", out_dir], root, KillAt("specbench.store:RunStore.append_prompt", 1, "SIGKILL", "after"))
    partial.communicate(timeout=600)
    run_dir = run_dir_of(out_dir)
    first = spawn(["run", "--resume", run_dir, "--json"], root,  # stopped at its first prompt's records, lock held
                  hold_at=HoldAt("specbench.store:RunStore.append_prompt", root / "held-resume", root / "release-resume"))
    second = spawn(["run", "--resume", run_dir, "--json"], root, go_file=root / "go")
    problems, _ = second_writer(first, second, root / "held-resume", root / "go", root / "release-resume")
    problems += [] if first.returncode else compare(run_dir, reference)
    fault("two --resume processes on one run directory", problems, lost=[p for p in problems if "twice" in p or "other" in p])
    return results


def smollm2_cases(s: Sweep, w: dict) -> None:
    """The window and load cases against the embedded SmolLM2-135M (8,192 positions)."""
    T = ["--target", "smollm2-135m"]
    s.bad("smollm2: run 5 MB prompt", ["run", *T, "--workload", w["huge"], "--out", "{case}/out"], "8192-token context window", limit_s=60)
    s.bad("smollm2: profile --context-tokens 100000", ["profile", *T, "--context-tokens", 100000, "--out", "{case}/p.json"],
          "8192", limit_s=60)
    s.bad("smollm2: run --max-new-tokens 9000", ["run", *T, "--max-new-tokens", 9000, "--out", "{case}/out"], "--max-new-tokens", limit_s=60)
    s.check("smollm2: a cold-cache conversion writes no progress frames into a redirected stderr", lambda: cold_conversion(s.root / "cold"))


def cold_conversion(root: Path) -> list[str]:
    """The embedded GGUF converted into an empty cache, stderr a pipe: no carriage-return frames in it."""
    from faults import spawn

    root.mkdir()
    proc = spawn(["profile", "--target", "smollm2-135m", "--max-tokens", 2, "--repeats", 1, "--context-tokens", 8, "--out", root / "p.json"],
                 root, env={"SPECBENCH_CACHE": str(root / "cache")})
    _, err = proc.communicate(timeout=900)
    problems = [] if proc.returncode == 0 else [f"exit {proc.returncode}: {err[-400:]}"]
    return problems + (["carriage-return progress in stderr: " + repr(err[-300:])] if "\r" in err else [])


def wait_for(path: Path, proc, timeout_s: float = 900) -> bool:
    """Wait until `path` exists while `proc` runs; False if it ended first (or never got there)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def second_writer(first, second, held: Path, go: Path, release: Path) -> tuple[list[str], str]:
    """`first` stops inside its write lock (HoldAt: touches `held`, waits for `release`); `second`
    is released (`go`) only then and must be refused in one line; then `first` goes on. No timing:
    however loaded the machine, the second meets the lock."""
    holds = wait_for(held, first)
    go.touch()
    _, err2 = second.communicate(timeout=900)
    release.touch()
    _, err1 = first.communicate(timeout=900)
    problems = [] if holds else [f"the first writer never reached its write: {err1[-300:]}"]
    problems += one_error_line(err2) + ([] if second.returncode == 2 and "another specbench process" in err2 else [f"second: exit {second.returncode}: {err2[-300:]}"])
    problems += [f"first: exit {first.returncode}: {err1[-300:]}"] if first.returncode else []
    return problems, err1


FAULTS28 = [
    "two record --hidden into one log",
    "two train-data into one --out",
    "SIGTERM of train-data between two saves, then train",
    "SIGTERM of train between two saves, then run --heads",
    "SIGTERM of record inside a file write",
    "SIGTERM of report --csv inside a file write",
    "SIGTERM of report --html inside a file write",
    "SIGTERM of report --plot inside a file write",
    "SIGTERM of tune inside a file write",
    "PYTHONIOENCODING=ascii specbench report",
    "a plugin that parses argv at import",
]


def faults28(root: Path, m: dict, w: dict, extra: dict) -> dict[str, list[str]]:
    """Second writers, SIGTERM inside writes and odd environments, in real processes (issue 28)."""
    from faults import HoldAt, KillAt, spawn

    results: dict[str, list[str]] = {}
    root.mkdir()
    T = ["--target", m["target"]]
    rec = ["record", *T, "--workload", w["many"], "--max-new-tokens", 8, "--hidden", "--no-profile"]
    td = ["train-data", *T, "--workload", w["many"], "--max-new-tokens", 8]
    procs, checks = {}, {}

    # second writers: the first holds the lock, the second is released (go file) and must be refused
    (root / "rec").mkdir()
    first = spawn([*rec, "--out", root / "rec" / "log.jsonl"], root,  # stopped as it starts recording, lock held
                  hold_at=HoldAt("specbench.simulate.record:_record", root / "held-rec", root / "release-rec"))
    second = spawn([*rec, "--limit", 2, "--out", root / "rec" / "log.jsonl"], root, go_file=root / "go-rec")
    problems, _ = second_writer(first, second, root / "held-rec", root / "go-rec", root / "release-rec")
    header = json.loads((root / "rec" / "log.jsonl").read_text().splitlines()[0]) if (root / "rec" / "log.jsonl").exists() else {}
    side = root / "rec" / str(header.get("hidden_file"))
    problems += [] if side.is_file() else ["the log names a side file that is not there"]
    code, _, err, _ = invoke(["simulate", "--log", root / "rec" / "log.jsonl", "--k", 2, "--bandwidth", 100, "--out", root / "rec-sims"])
    results[FAULTS28[0]] = problems + ([] if code == 0 else [f"the log does not simulate: {err[-300:]}"])

    first = spawn([*td, "--out", root / "data"], root,  # stopped before it generates, lock held
                  hold_at=HoldAt("specbench.train.data:_generate", root / "held-data", root / "release-data"))
    second = spawn([*td, "--limit", 2, "--out", root / "data"], root, go_file=root / "go-data")
    problems, _ = second_writer(first, second, root / "held-data", root / "go-data", root / "release-data")
    meta = json.loads((root / "data" / "meta.json").read_text()) if (root / "data" / "meta.json").exists() else {}
    problems += [] if meta.get("prompts") == 12 else [f"meta says {meta.get('prompts')} prompts, not the first writer's 12"]
    results[FAULTS28[1]] = problems

    # SIGTERM between the data directory's saves (tokens written, hidden states not): train refuses the directory
    shutil.copytree(extra["data"], root / "mixed")
    procs[FAULTS28[2]] = spawn([*td, "--limit", 3, "--out", root / "mixed", "--overwrite"], root,
                               KillAt("specbench.train.data:atomic_write", 2, "SIGTERM"))

    # SIGTERM between a checkpoint's saves (config.json written, the weights not): every loader refuses the directory
    shutil.copytree(extra["ckpt"], root / "ckpt-mixed")  # not root / "ckpt": the train-data fault's train writes there
    procs[FAULTS28[3]] = spawn(["train", "--drafter", "medusa", *T, "--data", extra["data"], "--out", root / "ckpt-mixed", "--steps", 1,
                                "--num-heads", 3, "--overwrite"], root, KillAt("specbench.train.heads:torch.save", 1, "SIGTERM"))

    # SIGTERM inside a write (the fsync of a temporary file): no hidden temporary file left, one line, exit 130
    writes = {
        FAULTS28[4]: [*rec, "--out", "{dir}/log.jsonl"],
        FAULTS28[5]: ["report", extra["run_dir"], "--csv", "{dir}/r.csv"],
        FAULTS28[6]: ["report", extra["run_dir"], "--html", "{dir}/r.html"],
        FAULTS28[7]: ["report", extra["run_dir"], "--plot", "{dir}/plots"],
        FAULTS28[8]: ["tune", "--log", extra["log"], "--drafter", "prompt-lookup", "--draft-ms", 1, "--out", "{dir}/tree.json",
                      "--plot", "{dir}/frontier.png"],
    }
    for i, (name, argv) in enumerate(writes.items()):
        d = root / f"write{i}"
        d.mkdir()
        checks[name] = d
        procs[name] = spawn([str(a).replace("{dir}", str(d)) for a in argv], root, KillAt("specbench.files:os.fsync", 1, "SIGTERM"),
                            env={"TMPDIR": str(d)})
    procs[FAULTS28[9]] = spawn(["report", extra["run_dir"]], root, env={"PYTHONIOENCODING": "ascii"})
    site = root / "site"
    (site / "argv_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "argv_plugin.py").write_text("import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument('--only-mine', required=True)\n"
                                         "parser.parse_args()\n")
    (site / "argv_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: argv-plugin\nVersion: 0.1\n")
    (site / "argv_plugin-0.1.dist-info" / "entry_points.txt").write_text("[specbench.drafters]\nargv-plugin = argv_plugin:Drafter\n")
    procs[FAULTS28[10]] = spawn(["run", *T, "--workload", w["good"], "--limit", 1, "--max-new-tokens", 4, "--out", root / "plugin-out",
                                "--json"], root, env={"PYTHONPATH": os.pathsep.join([str(site), *sys.path])})
    done = {name: (proc, *proc.communicate(timeout=600)) for name, proc in procs.items()}

    proc, _, err = done[FAULTS28[2]]
    problems = one_error_line(err) + ([] if proc.returncode == 130 else [f"exit {proc.returncode}"])
    code, _, err, _ = invoke(["train", "--drafter", "medusa", *T, "--data", root / "mixed", "--out", root / "ckpt", "--steps", 1])
    lines = [x for x in err.splitlines() if x.strip()]
    problems += [] if code == 2 and len(lines) == 1 and "half written" in err else [f"train on the mix: exit {code}: {err[-400:]}"]
    results[FAULTS28[2]] = problems
    proc, _, err = done[FAULTS28[3]]
    problems = one_error_line(err) + ([] if proc.returncode == 130 else [f"exit {proc.returncode}"])
    code, _, err, _ = invoke(["run", *T, "--drafter", "medusa", "--heads", root / "ckpt-mixed", "--limit", 1, "--max-new-tokens", 4,
                              "--out", root / "ckpt-run"])
    lines = [x for x in err.splitlines() if x.strip()]
    problems += [] if code == 2 and len(lines) == 1 and "half written" in err else [f"run on the mix: exit {code}: {err[-400:]}"]
    results[FAULTS28[3]] = problems
    for name, d in checks.items():
        proc, _, err = done[name]
        # temporary files and folders are hidden (.NAME.*), as lock files are; $TMPDIR is the case folder too
        left = [str(p.relative_to(d)) for p in d.rglob("*") if p.name.startswith((".", "tmp", "specbench-plots")) or ".tmp" in p.name]
        # 130 as ctrl-C, or 2 where the command says what it kept ("interrupted; the log is as it was")
        problems = one_error_line(err) + ([] if proc.returncode in (2, 130) and "interrupted" in err else [f"exit {proc.returncode}"])
        results[name] = problems + ([f"left {left}"] if left else [])
    proc, out, err = done[FAULTS28[9]]
    results[FAULTS28[9]] = [] if proc.returncode == 0 and "Traceback" not in err else [f"exit {proc.returncode}: {err[-400:]}"]
    proc, out, err = done[FAULTS28[10]]
    results[FAULTS28[10]] = [] if proc.returncode == 0 and "Traceback" not in err else [f"exit {proc.returncode}: {err[-400:]}"]
    return results
