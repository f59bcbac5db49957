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

t = load_target("smollm2-135m", "cpu", "auto", "fast")
dec = t.decoder
stack = dec.lean_stack
prompt = torch.arange(100, 164)
chain = DraftTree.chain(torch.tensor([3, 9, 11]))
res = {"stack": [], "transformers": []}
with torch.inference_mode():
    t.prefill(prompt, (None,), max_positions=256)
    for rep in range(40):
        for name in ("stack", "transformers"):
            dec.lean_stack = stack if name == "stack" else None
            a = time.perf_counter()
            t.verify(5, chain, (None,))
            res[name].append((time.perf_counter() - a) * 1e3)
            t.commit([0])
for k, v in res.items():
    print(f"{k}: median {statistics.median(v[5:]):.2f} ms over {len(v)-5}")
