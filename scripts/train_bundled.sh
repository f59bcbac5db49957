#!/usr/bin/env bash
# Reproduce the drafters bundled for the embedded default (SmolLM2-135M-Instruct):
# self-distillation data from the built-in prompt pool, then a 1-layer distilled
# draft model and 4 Medusa heads with the target's LM head tied, then copy them
# into specbench/bundled/. Sized for a 2-core CPU; see docs/train.md for what was
# measured. Run from the repository root with the venv active.
set -euo pipefail
WORK=${WORK:-train-work}
mkdir -p "$WORK"

# 1. the target's own greedy answers to the first 96 prompts of the pool (hidden states cached)
specbench train-data --target smollm2-135m --workload pool-train --limit 96 --max-new-tokens 96 \
  --batch-size 32 --out "$WORK/data" --overwrite

# 2. the draft model: the target's first layer + its norm, embeddings/LM head frozen and tied
specbench train --drafter draft-model --target smollm2-135m --data "$WORK/data" \
  --layers 1 --steps ${DRAFT_STEPS:-60} --batch-tokens 512 --lr 1e-3 --warmup 6 --eval-every 20 --eval-fraction 0.1 \
  --out "$WORK/draft" --overwrite

# 3. Medusa-1 heads, LM head tied to the target's
specbench train --drafter medusa --target smollm2-135m --data "$WORK/data" \
  --heads 4 --tie-lm-head --steps ${MEDUSA_STEPS:-60} --batch-tokens 512 --lr 1e-3 --warmup 6 --eval-every 20 --eval-fraction 0.1 \
  --out "$WORK/medusa" --overwrite

# 4. into the package (fp16 draft layers, bf16 heads)
python -m specbench.train.bundle "$WORK/draft" smollm2-135m-draft --base smollm2-135m
python -m specbench.train.bundle "$WORK/medusa" smollm2-135m-medusa
