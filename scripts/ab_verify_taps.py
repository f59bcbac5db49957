"""A/B on the embedded default (CPU fast engine): a 4-row chain verify that taps the final normed
state (what Medusa, Hydra and EAGLE-1 read), run by the stack in one call against transformers'
forward, the two interleaved in one process; prints the median ms of each.

    python scripts/ab_verify_taps.py
"""

import statistics
import time

import torch

from specbench.engine.tree import DraftTree
from specbench.targets import load_target

target = load_target("smollm2-135m", "cpu", "auto", "fast")
decoder = target.decoder
stack = decoder.lean_stack
prompt = torch.arange(100, 164)
chain = DraftTree.chain(torch.tensor([3, 9, 11]))
times_ms: dict[str, list[float]] = {"stack": [], "transformers": []}
with torch.inference_mode():
    target.prefill(prompt, (None,), max_positions=256)
    for _ in range(40):
        for path, times in times_ms.items():
            decoder.lean_stack = stack if path == "stack" else None  # None: transformers' forward
            began = time.perf_counter()
            target.verify(5, chain, (None,))
            times.append((time.perf_counter() - began) * 1e3)
            target.commit([0])  # keep the root: the context grows by one position per verify
WARM = 5  # the first verifies of each path are not counted
for path, times in times_ms.items():
    print(f"{path}: median {statistics.median(times[WARM:]):.2f} ms over {len(times) - WARM}")
