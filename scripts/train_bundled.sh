#!/usr/bin/env bash
# Reproduce the drafters bundled for the embedded default (SmolLM2-135M-Instruct):
# self-distillation data from the built-in prompt pool, a 1-layer distilled draft
# model and 4 Medusa heads with the target's LM head tied, copied into
# specbench/bundled/. These are the exact settings used (sized for a shared 2-core
# CPU; see docs/train.md for what was measured). Run from the repository root with
# the venv active.
set -euo pipefail
WORK=${WORK:-train-work}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# 1. the target's own greedy answers to the first 96 prompts of the pool (hidden states cached)
specbench train-data --target smollm2-135m --workload pool-train --limit 96 --max-new-tokens 96 \
  --batch-size 32 --out "$WORK/data" --overwrite

# 2. the draft model: the target's first layer + final norm; embeddings/LM head frozen and tied
specbench train --drafter draft-model --target smollm2-135m --data "$WORK/data" --layers 1 \
  --steps 60 --batch-tokens 256 --lr 2e-3 --warmup 5 --eval-every 30 --eval-fraction 0.1 --train-vocab all \
  --out "$WORK/draft" --overwrite

# 3. Medusa-1 heads, LM head tied to the target's
specbench train --drafter medusa --target smollm2-135m --data "$WORK/data" --heads 4 --tie-lm-head \
  --steps 100 --batch-tokens 256 --lr 1e-3 --warmup 5 --eval-every 50 --eval-fraction 0.1 --train-vocab seen \
  --out "$WORK/medusa" --overwrite

# 4. Hydra++ heads (not bundled: every head has its own 49152x576 LM head; measured with --heads DIR)
specbench train --drafter hydra --target smollm2-135m --data "$WORK/data" --heads 4 \
  --steps 100 --batch-tokens 256 --lr 5e-4 --warmup 5 --eval-every 50 --eval-fraction 0.1 --train-vocab seen \
  --out "$WORK/hydra" --overwrite

# 5. into the package (fp16 draft layers, bf16 heads)
python -m specbench.train.bundle "$WORK/draft" smollm2-135m-draft --base smollm2-135m
python -m specbench.train.bundle "$WORK/medusa" smollm2-135m-medusa
