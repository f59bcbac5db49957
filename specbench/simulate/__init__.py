"""Score drafters from a recorded target log without running the target.

- `log`: the versioned JSONL target log (header, verify profile, one record per prompt/turn)
  and its hidden-state side file.
- `record`, `profile`: write a log through the one decode loop; measure verify latency.
- `proposals`, `walk`: the teacher-forced pass (true-token ranks per draft position)
  and the walk along the log that the online loop would take.
- `replay`: step replay, the fallback for drafters without the teacher-forced hook.
- `predict`: throughput from a latency model (verify profile or roofline).
- `dsd`: the Decoding-Speculative-Decoding log format, its simulation and its counting.
- `runner`: `specbench simulate` end to end, writing the same records as `run`.
"""
