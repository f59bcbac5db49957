"""Target backends side by side on one machine, in one run of this script: plain and
speculative tokens/s with `--backend hf`, `--backend deepspeed --tp 1`, `--tp 2`, ...,
the ratios to hf, and whether each backend's outputs equal hf's token for token.

    python scripts/bench_deepspeed.py --shape small --tp 1,2 --limit 3 --max-new-tokens 48
    python scripts/bench_deepspeed.py --shape vicuna-7b --device cuda --dtype float16 --tp 1   # on a GPU

The target is a random-weight Llama of the named shape with the SmolLM2 tokenizer
(built once under --out; its vocabulary is the tokenizer's), or any --target.
Each configuration is a real `specbench run` (deepspeed with --tp 2+ goes through
the `deepspeed` launcher), so the numbers include everything a run does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from specbench.store import RunStore

SHAPES = {  # hidden, layers, heads, kv heads, MLP width
    "small": (512, 8, 8, 4, 1408),
    "vicuna-7b": (4096, 32, 32, 32, 11008),
}


def random_target(shape: str, out: Path) -> Path:
    """A random-weight Llama of `shape` with the SmolLM2 tokenizer, saved once under `out`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from specbench.targets.loading import model_location

    directory = out / "models" / f"random-{shape}"
    if (directory / "config.json").exists():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(model_location("smollm2-135m"))
    hidden, layers, heads, kv_heads, mlp = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16 if hidden >= 4096 else torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run(args, target: str, backend: str, tp: int) -> tuple[dict, dict]:
    """One `specbench run`; (its JSON summary, output ids per (prompt, turn, mode))."""
    command = [sys.executable, "-m", "specbench", "run", "--target", target, "--drafter", args.drafter,
               "--workload", args.workload, "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens),
               "--device", args.device, "--dtype", args.dtype, "--backend", backend, "--tp", str(tp),
               "--out", str(args.out / "runs"), "--json", *args.extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    summary = json.loads(done.stdout)
    _, turns = RunStore.open(Path(summary["run"])).load()
    return summary, {(t.prompt_id, t.turn, t.mode): t.output_ids for t in turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="alias, hub id or directory (default: a random-weight model of --shape)")
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--tp", default="1,2", help="deepspeed tensor-parallel sizes to run, comma-separated")
    parser.add_argument("--drafter", default="prompt-lookup")
    parser.add_argument("--workload", default="builtin")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("results/bench_deepspeed"))
    parser.add_argument("extra", nargs="*", help="more `specbench run` flags, after --")
    args = parser.parse_args()

    target = args.target or str(random_target(args.shape, args.out))
    configs = [("hf", 1)] + [("deepspeed", int(tp)) for tp in args.tp.split(",")]
    results = {config: run(args, target, *config) for config in configs}
    hf_summary, hf_outputs = results["hf", 1]

    table = Table(title=f"{args.drafter} → {target} ({args.device}, {args.dtype}), {args.workload} ×{args.limit}, {args.max_new_tokens} new tokens")
    for column in ("backend", "tp", "plain tok/s", "spec tok/s", "speedup", "plain ÷ hf", "spec ÷ hf", "outputs = hf", "spec = own plain"):
        table.add_column(column, justify="right")
    for (backend, tp), (summary, outputs) in results.items():
        same = sum(outputs.get(key) == ids for key, ids in hf_outputs.items())
        table.add_row(
            backend, str(tp),
            f"{summary['baseline_tokens_per_s']:.1f}", f"{summary['tokens_per_s']:.1f}", f"{summary['speedup']:.2f}×",
            f"{summary['baseline_tokens_per_s'] / hf_summary['baseline_tokens_per_s']:.2f}",
            f"{summary['tokens_per_s'] / hf_summary['tokens_per_s']:.2f}",
            f"{same}/{len(hf_outputs)}", f"{summary['exact_match_rate']:.0%}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
