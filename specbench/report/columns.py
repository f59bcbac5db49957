"""How a report frame's column is shown to a person: its header (with the unit) and its format.

One place for the console tables and the HTML page alike, so `acceptance_rate`
reads "acceptance" and 0.414 reads 41.4% wherever it is shown; the CSV and
parquet exports keep the frames' own names and raw values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    key: str  # the frame's column
    header: str  # what a reader sees, unit included
    spec: str  # format spec: "d" a count, ".1%" a rate shown as a percentage
    suffix: str = ""
    meaning: str = ""  # one line for a reader (the HTML page's tooltip and notes)

    def format(self, value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{int(value) if self.spec == 'd' else value:{self.spec}}{self.suffix}"


COLUMNS = {c.key: c for c in [
    Column("speedup", "speedup", ".2f", "×", "drafter tokens/s ÷ plain-decoding tokens/s, measured in the same run"),
    Column("tau", "τ", ".2f", "", "tokens per verification step, the target's bonus token included (plain decoding = 1.00)"),
    Column("exact_match_rate", "exact", ".1%", "", "share of answers identical to plain decoding's, token for token"),
    Column("acceptance_rate", "acceptance", ".1%", "", "accepted ÷ drafted tokens (every tree node counts as drafted)"),
    Column("tokens_per_s", "tokens/s", ".1f", "", "new tokens ÷ decode wall time, over all prompts"),
    Column("baseline_tokens_per_s", "plain tokens/s", ".1f", "", "the same for plain decoding"),
    Column("draft_ms_per_step", "draft ms/step", ".2f", "", "the drafter's proposal, per verification step"),
    Column("verify_ms_per_step", "verify ms/step", ".2f", "", "the target's forward over root and draft"),
    Column("overhead_ms_per_step", "other ms/step", ".2f", "", "acceptance, KV compaction and bookkeeping"),
    Column("cost_coefficient", "c = draft/verify", ".3f"),
    Column("mbsu", "MBSU", ".2f", "×", "memory-bound speedup model τ / (c·γ + 1), c from weight bytes"),
    Column("prompts", "prompts", "d"),
    Column("steps", "steps", "d", "", "verification steps of the drafter"),
    Column("runs", "runs", "d"),
    Column("steps_reaching", "steps reaching it", "d"),
    Column("unconditional", "unconditional", ".1%", "", "P(accepted ≥ i) over steps whose draft reached depth i"),
    Column("conditional", "conditional", ".1%", "", "P(accepted ≥ i | accepted ≥ i − 1)"),
    Column("position", "position", "d"),
    Column("draft_ms", "draft ms", ".2f"),
    Column("verify_ms", "verify ms", ".2f"),
    Column("other_ms", "other ms", ".2f"),
    Column("tokens_per_step", "tokens/step", ".2f"),
    Column("batch_size", "B", "d", "", "sequences decoded at once (rows of one forward)"),
    Column("ms_per_token", "ms/token per request", ".2f", "", "each answer's wall time from the moment its row took it, over its tokens"),
]}


def cell(key: str, value) -> str:
    """`value` of frame column `key` as a reader sees it; a column not declared above is shown as it is."""
    column = COLUMNS.get(key)
    if column is not None:
        return column.format(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return str(value)


def header(key: str) -> str:
    column = COLUMNS.get(key)
    return column.header if column else key.replace("_", " ")
