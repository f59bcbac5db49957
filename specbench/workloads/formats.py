"""The published prompt-file formats, detected from a file's rows, and how a row becomes a `Prompt`.

One place for every format a workload can come in:
- `fastchat-question`: FastChat's MT-Bench question.jsonl (`question_id`, `category`, `turns`);
- `spec-bench`: Spec-Bench's question.jsonl, the same shape with its 13 categories;
- `mt-bench-hub`: rows of the hub dataset HuggingFaceH4/mt_bench_prompts (`prompt` list, `category`);
- `hellaswag`: the original hellaswag_val.jsonl and the hub's Rowan/hellaswag (`ctx`, `endings`, `activity_label`);
- `dsd-prompts`: the DSD paper's `{"prompt": "..."}` lines;
- `jsonl`: any JSONL whose rows hold a `turns` list (chat) or a `prompt` string (completion),
  with optional `id`/`question_id` and `category`.
"""

from __future__ import annotations

from specbench.errors import UserError

LABELS = {
    "fastchat-question": "FastChat question.jsonl",
    "spec-bench": "Spec-Bench question.jsonl",
    "mt-bench-hub": "HuggingFaceH4/mt_bench_prompts rows",
    "hellaswag": "HellaSwag jsonl (ctx, endings)",
    "dsd-prompts": 'DSD prompts JSONL ({"prompt": ...})',
    "sharegpt": "ShareGPT conversations (human turns kept, recorded answers dropped)",
    "jsonl": "JSONL with 'turns' or 'prompt' per row",
}

# FastChat numbers the MT-Bench questions 81..160 in file order; the hub dataset keeps that order
MT_BENCH_FIRST_ID = 81


def detect(rows: list[dict], spec_bench_only: set[str]) -> str:
    """The format of a file from its rows (the first row decides the shape);
    `spec_bench_only`: the categories Spec-Bench has beyond MT-Bench's eight."""
    first = rows[0]
    if "ctx" in first and "endings" in first:
        return "hellaswag"
    if isinstance(first.get("prompt"), list):
        return "mt-bench-hub"
    if "question_id" in first and isinstance(first.get("turns"), list):
        categories = {str(r.get("category")) for r in rows}
        return "spec-bench" if categories & spec_bench_only else "fastchat-question"
    if set(first) == {"prompt"}:
        return "dsd-prompts"
    if isinstance(first.get("conversations"), list):
        return "sharegpt"
    return "jsonl"


def _texts(values: list, where: str, what: str = "turn") -> tuple[str, ...]:
    """Turns as text; a null, a number or a list is refused, never turned into "None" or "42"."""
    for i, value in enumerate(values, 1):
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise UserError(f"{where}: {what} {i} is {kind}, not text; give every {what} as a string (or drop the row)")
    return tuple(values)


def to_prompt(fmt: str, row: dict, index: int, where: str, prompt_type):
    """Row `index` (0-based) of a `fmt` file as a Prompt; `where` names file:line for errors."""
    if fmt == "hellaswag":
        if not isinstance(row.get("ctx"), str):
            raise UserError(f"{where}: a HellaSwag row needs a 'ctx' string")
        return prompt_type(str(row.get("ind", index)), str(row.get("activity_label") or "hellaswag"), (row["ctx"],), chat=False)
    if fmt == "mt-bench-hub":
        turns = row.get("prompt")
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: an mt_bench_prompts row needs a 'prompt' list")
        return prompt_type(str(MT_BENCH_FIRST_ID + index), str(row.get("category", "default")), _texts(turns, where), chat=True)
    pid = str(row.get("id", row.get("question_id", index + 1)))
    category = str(row.get("category", "hellaswag" if fmt == "dsd-prompts" else "default"))
    if fmt == "sharegpt":
        conversation = row.get("conversations")
        humans = list(_texts([m.get("value", "") for m in conversation or [] if isinstance(m, dict) and m.get("from") in ("human", "user")],
                             where, "human turn"))
        if not humans:
            raise UserError(f"{where}: a ShareGPT row needs 'conversations' with at least one human turn")
        return prompt_type(pid, category, tuple(humans), chat=True)
    if isinstance(row.get("turns"), list) and row["turns"]:
        return prompt_type(pid, category, _texts(row["turns"], where), chat=True)
    if isinstance(row.get("prompt"), str):
        return prompt_type(pid, category, (row["prompt"],), chat=False)
    raise UserError(f"{where}: a row needs a 'turns' list or a 'prompt' string")
