"""How far apart do the two greedy paths' logits land by rounding alone?

The evidence behind the near-tie tolerance (specbench/engine/divergence.py,
docs/metrics.md): decode N tokens one at a time (plain decoding's path), then
verify the same tokens as chains of K drafted tokens in one forward (the
speculative path), and compare the logits rows of each position. Prints, per
model and dtype, the largest disagreement between the paths on the difference
of the two best logits — the quantity the near-tie rule bounds — in units of
eps(dtype)·max|logit|, and as a fraction of the tolerance the rule allows.

    python scripts/rounding_disagreement.py                      # SmolLM2 + a random 512 × 8 Llama, CPU
    python scripts/rounding_disagreement.py --shape 2048x8 --shape 1024x24 --no-smollm2
    python scripts/rounding_disagreement.py --device cuda --shape 4096x32 --no-smollm2
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specbench.engine.divergence import TIE_FACTOR, rounding_eps
from specbench.engine.tree import DraftTree
from specbench.targets.hf import HFTarget

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_llama(hidden: int, layers: int, device: torch.device, dtype: torch.dtype) -> HFTarget:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to(device, dtype).eval()  # transformers' init: std 0.02
    return HFTarget(model, name=f"random {hidden}x{layers}")


@torch.inference_mode()
def disagreement(target: HFTarget, prompt: torch.Tensor, tokens: int, chain: int) -> tuple[float, float, int]:
    """(worst top-pair disagreement / eps(storage)·s, the same / tolerance, positions compared)."""
    logits, _ = target.prefill(prompt)
    output, stepped = [int(logits[-1].argmax())], []
    for _ in range(tokens):
        row, _ = target.verify(output[-1], DraftTree.empty(target.device))
        stepped.append(row[0])
        output.append(int(row[0].argmax()))
        target.commit([])
    eps = rounding_eps(target.dtype, target.hidden_size, target.device)
    storage = max(torch.finfo(target.dtype).eps, torch.finfo(torch.float32).eps)
    worst_eps = worst_tol = 0.0
    compared = 0
    for start in range(0, tokens - chain - 1, chain):
        # prompt + output[:start + 1] in the cache, root output[start + 1], chain output[start + 2 : start + 2 + chain]
        target.prefill(torch.cat([prompt, torch.tensor(output[: start + 1], device=target.device)]))
        drafted = torch.tensor(output[start + 2 : start + 2 + chain], device=target.device)
        batched, _ = target.verify(output[start + 1], DraftTree.chain(drafted))
        for r in range(chain + 1):
            one, many = stepped[start + 1 + r], batched[r]
            a, b = one.topk(2).indices.tolist()
            pair = abs(float((one[a] - one[b]) - (many[a] - many[b])))
            scale = max(float(one.abs().max()), float(many.abs().max()))
            worst_eps = max(worst_eps, pair / (storage * scale))
            worst_tol = max(worst_tol, pair / (TIE_FACTOR * eps * scale))
            compared += 1
    return worst_eps, worst_tol, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable (default: all three)")
    parser.add_argument("--shape", action="append", help="random Llama HIDDENxLAYERS, repeatable (default: 512x8)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the embedded SmolLM2-135M")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--chain", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    prompt = torch.randint(10, 1000, (40,), device=device)
    print(f"device {device}; tolerance = {TIE_FACTOR} · rounding eps · max|logit| (specbench/engine/divergence.py)")
    print("model | dtype | positions | worst top-pair disagreement / (eps·max|logit|) | / tolerance")
    for dtype in [DTYPES[d] for d in (args.dtype or DTYPES)]:
        targets = [] if args.no_smollm2 else [lambda: HFTarget.load("smollm2-135m", device, dtype)]
        for shape in args.shape or ["512x8"]:
            hidden, layers = map(int, shape.split("x"))
            targets.append(lambda hidden=hidden, layers=layers: random_llama(hidden, layers, device, dtype))
        for load in targets:
            target = load()
            in_eps, in_tol, n = disagreement(target, prompt, args.tokens, args.chain)
            print(f"{target.name} | {str(dtype).removeprefix('torch.')} | {n} | {in_eps:.2f} | {in_tol:.3f}", flush=True)
            del target


if __name__ == "__main__":
    main()
