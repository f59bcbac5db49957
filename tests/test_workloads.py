"""Workloads: every published file format, detection, selection (categories, limit, shard), and one line for a missing dataset."""

import json

import pytest
from test_cli import run_cli

from specbench.errors import UserError
from specbench.runner import RunConfig
from specbench.workloads import (
    encode_turn,
    open_workload,
    parse_shard,
    registry,
    select,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MT_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
SPEC_ONLY = ["translation", "summarization", "qa", "math_reasoning", "rag"]


def fastchat_rows():
    # FastChat's data/mt_bench/question.jsonl: question_id 81.., category, turns (two), some with reference
    rows = []
    for i, category in enumerate(MT_CATEGORIES * 2):
        row = {"question_id": 81 + i, "category": category, "turns": [f"{category} question {i}?", f"follow-up {i}"]}
        if category == "math":
            row["reference"] = ["42", "43"]
        rows.append(row)
    return rows


def test_fastchat_question_jsonl(tmp_path):
    w = open_workload("mt-bench", write_jsonl(tmp_path / "question.jsonl", fastchat_rows()))
    assert w.format == "fastchat-question"
    assert len(w.prompts) == 16 and {p.category for p in w.prompts} == set(MT_CATEGORIES)
    first = w.prompts[0]
    assert (first.id, first.chat, len(first.turns)) == ("81", True, 2)
    assert "FastChat question.jsonl" in w.describe()


def test_spec_bench_question_jsonl_groups_13_categories_into_6_tasks(tmp_path):
    rows = [{"question_id": i, "category": c, "turns": [f"{c} {i}"]} for i, c in enumerate(MT_CATEGORIES + SPEC_ONLY)]
    w = open_workload(str(write_jsonl(tmp_path / "spec.jsonl", rows)))
    assert w.format == "spec-bench"
    assert len({p.category for p in w.prompts}) == 13
    tasks = {p.task for p in w.prompts}
    assert len(tasks) == 6 and "multi-turn conversation" in tasks and "retrieval-augmented generation" in tasks
    assert "13 categories, 6 tasks" in w.describe()
    # --categories takes a task name as well as a category
    assert {p.category for p in select(w.prompts, ["multi-turn conversation"])} == set(MT_CATEGORIES)


def test_hellaswag_original_format(tmp_path):
    rows = [{"ind": 24 + i, "activity_label": label, "ctx_a": "A man", "ctx_b": "is", "ctx": f"A man is sitting on a roof. he {i}",
             "split": "val", "split_type": "indomain", "label": 3, "endings": ["a", "b", "c", "d"], "source_id": "x"}
            for i, label in enumerate(["Roof shingle removal", "Clean and jerk", "Roof shingle removal"])]
    w = open_workload("hellaswag", write_jsonl(tmp_path / "hellaswag_val.jsonl", rows))
    assert w.format == "hellaswag"
    assert [p.id for p in w.prompts] == ["24", "25", "26"]
    assert all(not p.chat for p in w.prompts) and w.prompts[0].turns == ("A man is sitting on a roof. he 0",)
    assert {p.category for p in w.prompts} == {"Roof shingle removal", "Clean and jerk"}


def test_dsd_prompt_jsonl(tmp_path):
    rows = [{"prompt": f"The woman is washing dishes. She {i}"} for i in range(5)]
    w = open_workload("hellaswag", write_jsonl(tmp_path / "prompts.jsonl", rows))
    assert w.format == "dsd-prompts" and "DSD" in w.describe()
    assert [p.id for p in w.prompts] == ["1", "2", "3", "4", "5"] and not w.prompts[0].chat


def test_mt_bench_hub_rows_number_questions_as_fastchat_does(tmp_path):
    # the rows of HuggingFaceH4/mt_bench_prompts (prompt list, prompt_id hash, category, reference), saved as JSONL
    rows = [{"prompt": [f"q{i}", f"f{i}"], "prompt_id": 1234567 + i, "category": "writing", "reference": []} for i in range(3)]
    w = open_workload(str(write_jsonl(tmp_path / "hub.jsonl", rows)))
    assert w.format == "mt-bench-hub"
    assert [p.id for p in w.prompts] == ["81", "82", "83"] and w.prompts[0].turns == ("q0", "f0")


def test_generic_jsonl_mixes_turns_and_prompt(tmp_path):
    rows = [{"id": "a", "turns": ["hi", "more"]}, {"id": "b", "prompt": "Once", "category": "story"}]
    w = open_workload(str(write_jsonl(tmp_path / "mine.jsonl", rows)))
    assert w.format == "jsonl"
    assert [(p.id, p.chat, p.category) for p in w.prompts] == [("a", True, "default"), ("b", False, "story")]


def test_builtins_are_the_offline_default():
    w = open_workload()
    assert w.name == "builtin" and len(w.prompts) == 16 and len({p.category for p in w.prompts}) == 8
    assert open_workload("builtin-completion").format == "jsonl"


def test_selection_categories_limit_shard():
    prompts = open_workload("builtin").prompts
    maths = select(prompts, ["math", "coding"])
    assert {p.category for p in maths} == {"math", "coding"} and len(maths) == 4
    assert len(select(prompts, limit=5)) == 5
    shards = [select(prompts, limit=11, shard=f"{i}/3") for i in (1, 2, 3)]
    ids = [p.id for shard in shards for p in shard]
    assert sorted(ids) == sorted(p.id for p in prompts[:11]) and len(ids) == 11
    assert parse_shard("2/4") == (2, 4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: select(open_workload().prompts, ["nope"]), "unknown category nope: this workload has"),
        # `--categories ,` names no category: refused, not read as "all categories"
        (lambda: select(open_workload().prompts, RunConfig(categories=[","]).categories), "--categories names no category"),
        (lambda: parse_shard("0/2"), "i must be between 1 and n"),
        (lambda: parse_shard("x"), "--shard expects i/n"),
        (lambda: open_workload("nope"), "unknown workload 'nope': use one of builtin, builtin-completion, pool-train, pool-train-extra, pool-heldout, mt-bench"),
    ],
)
def test_bad_selection_is_a_user_error(call, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        call()


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        open_workload(str(path))
    write_jsonl(path, [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    with pytest.raises(UserError, match="prompt id 'x' appears twice"):
        open_workload(str(path))


@pytest.mark.parametrize("name, needs", [("mt-bench", "FastChat's"), ("spec-bench", "Spec-Bench's"), ("hellaswag", "hellaswag_val.jsonl")])
def test_missing_dataset_offline_is_one_line(name, needs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, out, err = run_cli(["run", "--workload", name, "--out", tmp_path], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert needs in err and str(tmp_path / "data") in err and "--workload-file" in err


def test_dataset_found_in_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECBENCH_DATA", str(tmp_path))
    (tmp_path / "mt-bench").mkdir()
    write_jsonl(tmp_path / "mt-bench" / "question.jsonl", fastchat_rows())
    assert len(open_workload("mt-bench").prompts) == 16


def test_workloads_command_lists_the_registry(capsys, monkeypatch):
    code, out, _ = run_cli(["workloads"], capsys, monkeypatch)
    assert code == 0
    for name in registry():
        assert name in out
    assert "HuggingFaceH4/mt_bench_prompts" in out and "--workload-file" in out


def test_second_turn_follows_the_models_own_answer_in_the_chat_template():
    from tiny import char_tokenizer

    tok = char_tokenizer()
    prompt = open_workload("builtin").prompts[0]  # writing-1, two turns
    ids = encode_turn(tok, prompt, 1, ["MY ANSWER"])
    text = tok.decode(ids)
    assert text == f"user: {prompt.turns[0]}\nassistant: MY ANSWER\nuser: {prompt.turns[1]}\nassistant: "
