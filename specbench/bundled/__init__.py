"""Drafters trained by specbench for the embedded default target, shipped as package data.

Each subdirectory is one trained drafter; `specbench/catalogue/` says which
drafter and target it serves. A draft model is stored without its vocabulary
tables (they are frozen copies of the target's): `bundle.json` names the base
target they are taken from when the draft is first loaded (see
`specbench.targets.loading`). How each was trained: docs/train.md and
scripts/train_bundled.sh.
"""
