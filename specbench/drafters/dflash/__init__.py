"""The `dflash` drafter: parallel block drafting (DFlash v1, DFlash2, Meta's Muse Glimmer assistant).

- model.py: the draft network (`DFlashNet`, `DFlashConfig`)
- layouts.py: the three published checkpoint layouts, read strictly
- drafter.py: the drafter (`DFlashDrafter`, `DFlashOptions`): chain, best-first tree,
  trees of ranks; the teacher-forced pass for `simulate`
Formats, the decode loop and traps: docs/dflash.md.
"""
