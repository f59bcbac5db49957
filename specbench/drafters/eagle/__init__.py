"""EAGLE drafters: `eagle` (EAGLE-1 weights, EAGLE-2's dynamic tree) and `eagle3`.

- model.py: the draft network (`EagleNet`, `EagleConfig`; its KV cache is the engine's `StaticKV`)
- layouts.py: the published checkpoint layouts, read strictly and written back
- tree.py: EAGLE-2's dynamic tree, for one or many drafting problems at once
- drafter.py: the two drafters (`EagleDrafter`, `Eagle3Drafter`) and their options
Formats, defaults and traps: docs/eagle.md.
"""
