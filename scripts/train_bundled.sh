#!/usr/bin/env bash
# Reproduce the drafters bundled for the embedded default (SmolLM2-135M-Instruct):
# self-distillation data from the built-in prompt pool, a 1-layer distilled draft
# model, 4 Medusa heads and 3 Hydra++ heads (LM head and embeddings tied to the
# target's), copied into specbench/bundled/. These are the exact settings used
# (sized for a 2-core CPU; see docs/train.md for what was measured). Run from the
# repository root with the venv active.
set -euo pipefail
WORK=${WORK:-train-work}
mkdir -p "$WORK"

# 1. the target's own greedy answers to all 392 prompts of pool-train (hidden states cached;
#    --hidden-taps eagle3 also caches the states entering layers 2, 15, 27, which eagle3 reads)
specbench train-data --target smollm2-135m --workload pool-train --max-new-tokens 128 \
  --batch-size 32 --hidden-taps eagle3 --out "$WORK/data" --overwrite

#    and the 833 prompts of pool-train-extra (2026-12-05: the bundled Hydra heads are trained on both)
specbench train-data --target smollm2-135m --workload pool-train-extra --max-new-tokens 128 --batch-size 32 \
  --out "$WORK/data-extra" --overwrite

# 2. Hydra++ heads (prefix-mlp), 3 heads x 1 layer, LM head and embeddings tied to the target's, on both
#    data directories (2026-12-05, docs/train.md; the first bundle: --data "$WORK/data", 1000 steps, 5 % held out)
specbench train --drafter hydra --target smollm2-135m --data "$WORK/data,$WORK/data-extra" --num-heads 3 --hydra-layers 1 \
  --tie-lm-head --steps 2000 --max-minutes 30 --batch-tokens 512 --lr 1e-3 --warmup-steps 20 --eval-every 500 \
  --eval-fraction 0.03 --train-vocab seen --out "$WORK/hydra" --overwrite

# 3. Medusa-1 heads, LM head tied to the target's
specbench train --drafter medusa --target smollm2-135m --data "$WORK/data" --heads 4 --tie-lm-head \
  --steps 1000 --batch-tokens 512 --lr 1e-3 --warmup 20 --eval-every 250 --eval-fraction 0.05 --train-vocab seen \
  --out "$WORK/medusa" --overwrite

# 4. the draft model: the target's first layer + final norm; embeddings/LM head frozen and tied
specbench train --drafter draft-model --target smollm2-135m --data "$WORK/data" --layers 1 \
  --steps 200 --batch-tokens 512 --lr 2e-3 --warmup 10 --eval-every 100 --eval-fraction 0.05 --train-vocab all \
  --out "$WORK/draft" --overwrite

# 5. into the package: fp16 draft layers, bf16 Medusa heads, int8 (per-row scales) Hydra heads
python -m specbench.train.bundle "$WORK/draft" smollm2-135m-draft --base smollm2-135m
python -m specbench.train.bundle "$WORK/medusa" smollm2-135m-medusa
python -m specbench.train.bundle "$WORK/hydra" smollm2-135m-hydra --int8

# 6. EAGLE-1 and EAGLE-3 drafts (one decoder layer of the target's shape; embedding, and for
#    EAGLE-1 the LM head, the target's), one thread each (on 2026-11-26 they ran side by side); 120 steps is what
#    fitted the shared machine on 2026-11-26 (docs/eagle.md): not enough to beat the bundled Hydra, so not bundled
OMP_NUM_THREADS=1 specbench train --drafter eagle3 --target smollm2-135m --data "$WORK/data" --draft-vocab 4096 --ttt-steps 3 \
  --steps 120 --batch-tokens 512 --lr 2e-3 --warmup-steps 15 --eval-every 60 --eval-fraction 0.05 \
  --out "$WORK/eagle3" --overwrite
OMP_NUM_THREADS=1 specbench train --drafter eagle --target smollm2-135m --data "$WORK/data" --feature-noise 0.1 \
  --steps 120 --batch-tokens 512 --lr 2e-3 --warmup-steps 15 --eval-every 60 --eval-fraction 0.05 --train-vocab seen \
  --out "$WORK/eagle" --overwrite

#    the longer runs of 2026-12-04 (docs/eagle.md), each alone on the machine with 2 threads: EAGLE-1 400 steps
#    (2.6 min), EAGLE-3 480 steps (7.9 min); measured 0.40x and 0.56x on held-out prompts, so still not bundled
specbench train --drafter eagle3 --target smollm2-135m --data "$WORK/data" --draft-vocab 4096 --ttt-steps 3 \
  --steps 480 --max-minutes 10 --batch-tokens 512 --lr 2e-3 --warmup-steps 15 --eval-every 240 --eval-fraction 0.05 \
  --out "$WORK/eagle3-480" --overwrite
specbench train --drafter eagle --target smollm2-135m --data "$WORK/data" --feature-noise 0.1 \
  --steps 400 --max-minutes 14 --batch-tokens 512 --lr 2e-3 --warmup-steps 15 --eval-every 200 --eval-fraction 0.05 --train-vocab seen \
  --out "$WORK/eagle-400" --overwrite

# 7. held-out τ: the target's log on pool-heldout (final states and EAGLE-3's taps), then simulate
specbench record --target smollm2-135m --workload pool-heldout --max-new-tokens 96 --hidden --hidden-taps eagle3 \
  --out "$WORK/heldout.jsonl"
specbench simulate --log "$WORK/heldout.jsonl" --target smollm2-135m --drafter hydra --tree mc_sim_7b_63_depth3 --out "$WORK/sim"
specbench simulate --log "$WORK/heldout.jsonl" --target smollm2-135m --drafter eagle --heads "$WORK/eagle" \
  --tree dynamic,mc_sim_7b_63_depth3,mc_sim_7b_63 --out "$WORK/sim"
specbench simulate --log "$WORK/heldout.jsonl" --target smollm2-135m --drafter eagle3 --heads "$WORK/eagle3" \
  --tree dynamic,mc_sim_7b_63_depth3,mc_sim_7b_63 --out "$WORK/sim"

# 8. DFlash v1 draft (z-lab's layout: 5 Qwen3-style layers of the target's geometry on five taps, the
#    target's embedding and LM head): the same pool-train answers with the states DFlash reads (the
#    outputs of layers 1, 8, 14, 20, 27 by z-lab's tap rule = the inputs of 2, 9, 15, 21, 28), then a
#    block of 8 trained for what fitted the shared 2-core machine on 2026-12-04 (docs/dflash.md):
#    not enough to beat the bundled Hydra's held-out τ, so not bundled
OMP_NUM_THREADS=1 specbench train-data --target smollm2-135m --workload pool-train --max-new-tokens 128 --batch-size 32 \
  --no-cache-hidden --hidden-taps dflash --dtype float32 --device cpu --out "$WORK/data-dflash" --overwrite
OMP_NUM_THREADS=1 specbench train --drafter dflash --target smollm2-135m --data "$WORK/data-dflash" --block-size 8 --draft-layers 5 \
  --anchors 8 --loss-decay 4 --steps 80 --batch-tokens 512 --lr 1e-3 --warmup-steps 5 --eval-every 80 --eval-fraction 0.02 \
  --out "$WORK/dflash" --overwrite
#    the second run (2026-12-04, docs/dflash.md): a block of 4, 3 layers, 32 anchors, 700 steps bounded by the clock
OMP_NUM_THREADS=1 specbench train --drafter dflash --target smollm2-135m --data "$WORK/data-dflash" --block-size 4 --draft-layers 3 \
  --anchors 32 --loss-decay 4 --steps 700 --max-minutes 36 --batch-tokens 512 --lr 1e-3 --warmup-steps 40 --min-lr-ratio 0.1 \
  --eval-every 350 --eval-fraction 0.02 --device cpu --out "$WORK/dflash2" --overwrite

# 9. DFlash's held-out τ beside the bundled Hydra's, both simulated on one log of pool-heldout that holds
#    the final states (Hydra) and DFlash's taps
OMP_NUM_THREADS=1 specbench record --target smollm2-135m --workload pool-heldout --max-new-tokens 96 --hidden --hidden-taps dflash \
  --dtype float32 --device cpu --out "$WORK/heldout-dflash.jsonl"
OMP_NUM_THREADS=1 specbench simulate --log "$WORK/heldout-dflash.jsonl" --target smollm2-135m --dtype float32 --device cpu \
  --drafter hydra --tree mc_sim_7b_63_depth3 --latency-steps 4 --out "$WORK/sim-dflash"
OMP_NUM_THREADS=1 specbench simulate --log "$WORK/heldout-dflash.jsonl" --target smollm2-135m --dtype float32 --device cpu \
  --drafter dflash --weights "$WORK/dflash" --k 1,3 --tree mc_sim_7b_63_depth3 --latency-steps 4 --out "$WORK/sim-dflash"
OMP_NUM_THREADS=1 specbench simulate --log "$WORK/heldout-dflash.jsonl" --target smollm2-135m --dtype float32 --device cpu \
  --drafter dflash --weights "$WORK/dflash2" --k 1,2,3 --tree mc_sim_7b_63_depth3,dynamic --latency-steps 4 --out "$WORK/sim-dflash"
OMP_NUM_THREADS=1 specbench simulate --log "$WORK/heldout-dflash.jsonl" --target smollm2-135m --dtype float32 --device cpu \
  --drafter hydra --tree smollm2_hydra_cpu_tuned --latency-steps 4 --out "$WORK/sim-dflash"
OMP_NUM_THREADS=1 specbench simulate --log "$WORK/heldout-dflash.jsonl" --target smollm2-135m --dtype float32 --device cpu \
  --drafter medusa --tree mc_sim_7b_63,smollm2_medusa_cpu_tuned --latency-steps 4 --out "$WORK/sim-dflash"
OMP_NUM_THREADS=1 specbench simulate --log "$WORK/heldout-dflash.jsonl" --target smollm2-135m --dtype float32 --device cpu \
  --drafter prompt-lookup --k 3 --latency-steps 4 --out "$WORK/sim-dflash"
python scripts/bench_drafters.py --drafters dflash,hydra --workloads pool-heldout --limit 8 --max-new-tokens 64 \
  --dflash-weights "$WORK/dflash2" --out "$WORK/bench-dflash"
