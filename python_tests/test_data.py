"""qlora_ext.data and the shipped dataset: loaders (Alpaca / chat; jsonl / json / csv), errors naming file,
line and field, prompt masking and truncation, deterministic length-grouped batching."""
import collections
import csv
import json
import re
import subprocess
import sys

import pytest

from cli_fixtures import REPO, char_tokenizer
from qlora_ext import data as D


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def chat_tok():
    return char_tokenizer(chat_template=True)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# loaders


def test_alpaca_jsonl_json_csv_agree(tmp_path):
    recs = [{"instruction": "Sort.", "input": "b, a", "output": "a, b", "task": "sort"},
            {"instruction": "Say hi.", "output": "hi"},
            {"instruction": "Upper: é, ok", "input": "", "output": "É, OK"}]
    j = D.load_examples(write_jsonl(tmp_path / "d.jsonl", recs))
    (tmp_path / "d.json").write_text(json.dumps(recs), encoding="utf-8")
    js = D.load_examples(tmp_path / "d.json")
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        for r in recs:
            w.writerow({k: r.get(k, "") for k in ("instruction", "input", "output")})
    c = D.load_examples(tmp_path / "d.csv")
    for loaded in (j, js, c):
        assert [e.response for e in loaded] == ["a, b", "hi", "É, OK"]
        assert [e.messages for e in loaded] == [[{"role": "user", "content": "Sort.\nb, a"}],
                                                [{"role": "user", "content": "Say hi."}],
                                                [{"role": "user", "content": "Upper: é, ok"}]]
    assert j[0].meta == {"task": "sort"}


def test_chat_messages_and_role_aliases(tmp_path):
    recs = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "prompter", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "human", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}]
    ex = D.load_examples(write_jsonl(tmp_path / "chat.jsonl", recs))
    assert ex[0].response == "4" and [m["role"] for m in ex[0].messages] == ["system", "user"]
    assert ex[1].response == "Bye!"
    assert [m["role"] for m in ex[1].messages] == ["user", "assistant", "user"]


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": ', r"bad\.jsonl:2: invalid JSON"),
    ('{"instruction": "x"}', r"bad\.jsonl:2: field 'output': missing"),
    ('{"instruction": "x", "output": 3}', r"bad\.jsonl:2: field 'output': expected a string, got int"),
    ('{"instruction": "  ", "output": "y"}', r"bad\.jsonl:2: field 'instruction': empty"),
    ('{"question": "x", "answer": "y"}', r"bad\.jsonl:2: record has none of 'messages'"),
    ('{"prompt": "x", "completion": 5}', r"bad\.jsonl:2: field 'completion': expected a string, got int"),
    ('{"prompt": [{"role": "user", "content": "x"}], "completion": "y"}', r"bad\.jsonl:2: field 'prompt'/'completion'"),
    ('{"text": ""}', r"bad\.jsonl:2: field 'text': empty"),
    ('{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]}',
     r"bad\.jsonl:2: field 'conversations\[1\]\.value'"),
    ('[1, 2]', r"bad\.jsonl:2: expected an object, got list"),
    ('{"messages": []}', r"bad\.jsonl:2: field 'messages': expected a non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad\.jsonl:2: field 'messages\[0\]\.role': the last"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"bad\.jsonl:2: field 'messages\[0\]\.role': 'bot'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
     r"bad\.jsonl:2: field 'messages\[0\]\.content'"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}',
     r"bad\.jsonl:2: field 'messages': no user message"),
])
def test_malformed_jsonl_names_file_line_field(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "ok", "output": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=message):
        D.load_examples(p)


def test_malformed_files(tmp_path):
    with pytest.raises(D.DataError, match=r"unsupported data file extension '\.txt'"):
        D.load_examples(tmp_path / "x.txt")
    with pytest.raises(D.DataError, match="no such data file"):
        D.load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(D.DataError, match=r"empty\.jsonl: no records"):
        D.load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "num.json").write_text('42')
    with pytest.raises(D.DataError, match=r"num\.json:1: expected a JSON array of records \(or JSON lines\)"):
        D.load_examples(tmp_path / "num.json")
    (tmp_path / "rec.json").write_text('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]')
    with pytest.raises(D.DataError, match=r"rec\.json:record 1: field 'output': missing"):
        D.load_examples(tmp_path / "rec.json")
    (tmp_path / "broken.json").write_text('[{"instruction": "x",\n "output": }]')
    with pytest.raises(D.DataError, match=r"broken\.json:2: invalid JSON"):
        D.load_examples(tmp_path / "broken.json")
    (tmp_path / "cols.csv").write_text("question,answer\nx,y\n")
    with pytest.raises(D.DataError, match=r"cols\.csv:1: CSV header has no 'instruction' column and 'output'"):
        D.load_examples(tmp_path / "cols.csv")
    (tmp_path / "cells.csv").write_text("instruction,output\nx,y\na,b,c\n")
    with pytest.raises(D.DataError, match=r"cells\.csv:3: more cells than header columns"):
        D.load_examples(tmp_path / "cells.csv")
    (tmp_path / "blank.csv").write_text("instruction,input,output\nx,,\n")
    with pytest.raises(D.DataError, match=r"blank\.csv:2: field 'output': empty"):
        D.load_examples(tmp_path / "blank.csv")


def test_split_heldout_is_deterministic_and_disjoint():
    ex = [D.Example([{"role": "user", "content": str(i)}], str(i)) for i in range(50)]
    tr, he = D.split_heldout(ex, seed=3)
    tr2, he2 = D.split_heldout(ex, seed=3)
    assert [e.response for e in he] == [e.response for e in he2] and len(he) == 5
    assert sorted(e.response for e in tr + he) == sorted(str(i) for i in range(50))
    assert [e.response for e in D.split_heldout(ex, seed=4)[1]] != [e.response for e in he]


# ---------------------------------------------------------------------------------------------------------
# the shipped dataset


def _check_answer(r):
    """Recompute the answer of a shipped record from its input alone (an independent check of the generator)."""
    task, inp = r["task"], r["input"]
    items = [x.strip() for x in inp.split(",")]
    if task == "upper":
        return inp.upper()
    if task == "sort_words":
        return ", ".join(sorted(items))
    if task == "sort_numbers":
        return ", ".join(map(str, sorted(map(int, items))))
    if task == "max_number":
        return str(max(map(int, items)))
    if task == "count_items":
        return str(len(items))
    if task == "extract_email":
        return re.search(r"[\w.]+@[\w.]+\w", inp).group(0)
    if task == "extract_year":
        return re.search(r"\b\d{4}\b", inp).group(0)
    if task == "date_dmy":
        y, m, d = inp.split("-")
        return f"{d}/{m}/{y}"
    if task == "date_iso":
        nums = re.findall(r"\d+", inp)
        day, year = (nums[0], nums[1]) if len(nums) == 2 and len(nums[0]) <= 2 else (nums[0], nums[-1])
        month = next(i for i, names in enumerate(zip(*[
            "January February March April May June July August September October November December".split(),
            "janvier février mars avril mai juin juillet août septembre octobre novembre décembre".split(),
            "Januar Februar März April Mai Juni Juli August September Oktober November Dezember".split(),
            "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre".split()]))
            if any(re.search(rf"\b{n}\b", inp) for n in names)) + 1
        return f"{int(year):04d}-{month:02d}-{int(day):02d}"
    if task == "convert_units":
        value, unit = inp.split()
        return str(int(value) * {"km": 1000, "m": 100, "kg": 1000, "cm": 10, "L": 1000}[unit])
    if task == "add":
        a, b = inp.split("+")
        return str(int(a) + int(b))
    if task == "to_json":
        name = re.search(r"\b(" + "|".join(["Anna", "Marie", "Lukas", "Sofia", "Pierre", "Carmen", "Jonas",
                                            "Emma", "Diego", "Clara", "Felix", "Lucia", "Hugo", "Elena",
                                            "Paul", "Ines", "Max", "Julia", "Leon", "Nora"]) + r")\b", inp)
        return json.dumps({"name": name.group(1), "age": int(re.search(r"\d+", inp).group(0))})
    raise AssertionError(task)


def test_shipped_dataset():
    train = [json.loads(ln) for ln in D.DEFAULT_TRAIN.read_text(encoding="utf-8").splitlines()]
    held = [json.loads(ln) for ln in D.DEFAULT_HELDOUT.read_text(encoding="utf-8").splitlines()]
    assert len(train) >= 2000 and len(held) >= 200
    assert D.DEFAULT_TRAIN.stat().st_size + D.DEFAULT_HELDOUT.stat().st_size < 2_000_000
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in held}
    for split in (train, held):
        tasks = collections.Counter(r["task"] for r in split)
        langs = collections.Counter((r["task"], r["lang"]) for r in split)
        assert len(tasks) >= 10 and len(set(tasks.values())) == 1       # balanced over tasks
        assert {lang for _, lang in langs} == {"en", "fr", "de", "es"}
        assert len(langs) == 4 * len(tasks)                             # every task in every language
        for r in split:
            assert r["output"] == _check_answer(r), r
    assert len(D.load_examples(D.DEFAULT_TRAIN)) == len(train)


def test_shipped_dataset_regenerates_identically(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "gen_dataset.py"), "--out-dir", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (D.DATA_DIR / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------------
# tokenization


def test_encode_masks_the_prompt(tok):
    ex = D.Example([{"role": "user", "content": "Sort: b, a"}], "a, b")
    enc = D.encode_example(ex, tok)
    prompt = "### Instruction:\nSort: b, a\n\n### Response:\n"
    assert tok.decode(enc["input_ids"]) == "<s>" + prompt + "a, b</s>"
    n_prompt = 1 + len(prompt)
    assert enc["labels"][:n_prompt] == [D.IGNORE_INDEX] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tok.decode(enc["labels"][n_prompt:]) == "a, b</s>"
    src = D.encode_example(ex, tok, train_on_source=True)
    assert src["labels"] == src["input_ids"]


def test_encode_chat_template_target_ends_with_turn_marker(chat_tok):
    ex = D.Example([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "A1")
    enc = D.encode_example(ex, chat_tok)
    target = [t for t in enc["labels"] if t != D.IGNORE_INDEX]
    assert chat_tok.decode(target) == "A1<|im_end|>\n"
    prompt = chat_tok.decode(enc["input_ids"][:len(enc["input_ids"]) - len(target)])
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert D.encode_prompt(ex.messages, chat_tok) == enc["input_ids"][:len(enc["input_ids"]) - len(target)]


def test_truncation_keeps_prompt_end_and_answer_start(tok):
    ex = D.Example([{"role": "user", "content": "x" * 100}], "0123456789")
    enc = D.encode_example(ex, tok, source_max_len=20, target_max_len=4)
    assert len(enc["input_ids"]) == 24
    assert tok.decode(enc["input_ids"][:20]).endswith("### Response:\n")
    assert tok.decode(enc["input_ids"][20:]) == "0123"
    assert enc["labels"][:20] == [D.IGNORE_INDEX] * 20
    with pytest.raises(ValueError, match="source_max_len"):
        D.encode_example(ex, tok, source_max_len=0)


def test_collate_pads_right_and_masks_padding(tok):
    feats = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    b = D.collate(feats, pad=D.pad_id(tok))
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]


# ---------------------------------------------------------------------------------------------------------
# batching


@pytest.mark.parametrize("group", [True, False])
def test_batch_plan_covers_each_epoch_once_deterministically(group):
    import random
    lengths = [random.Random(i).randint(5, 300) for i in range(1037)]
    plan = D.BatchPlan(lengths, batch_size=8, seed=1, group_by_length=group)
    e0, e1 = plan.epoch(0), plan.epoch(1)
    assert len(e0) == len(plan) == 130
    for ep in (e0, e1):
        assert sorted(i for b in ep for i in b) == list(range(1037))
        assert all(1 <= len(b) <= 8 for b in ep)
    assert e0 == D.BatchPlan(lengths, 8, seed=1, group_by_length=group).epoch(0)   # pure function
    assert e0 != e1 and e0 != D.BatchPlan(lengths, 8, seed=2, group_by_length=group).epoch(0)


def test_group_by_length_reduces_padding():
    import random
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(2000)]

    def padding(plan):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plan.epoch(0))
    grouped = padding(D.BatchPlan(lengths, 8, seed=0, group_by_length=True))
    plain = padding(D.BatchPlan(lengths, 8, seed=0, group_by_length=False))
    assert grouped < 0.2 * plain


# ---------------------------------------------------------------------------------------------------------
# TRL / ShareGPT formats, more file kinds, every assistant turn trained


TRL_RECORDS = [{"text": "The sky is blue."},
               {"prompt": "2+2=", "completion": " 4"},
               {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
               {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name?"},
                                  {"from": "gpt", "value": "Bo"}, {"from": "human", "value": "Age?"},
                                  {"from": "gpt", "value": "3"}]},
               {"instruction": "Say hi.", "output": "hi", "task": "greet"}]


def _check_trl_examples(ex):
    assert [e.response for e in ex] == ["The sky is blue.", " 4", "Hello", "3", "hi"]
    assert ex[0].raw_prompt == "" and not ex[0].checkable
    assert ex[1].raw_prompt == "2+2=" and ex[1].checkable
    assert ex[2].raw_prompt is None and ex[2].messages == [{"role": "user", "content": "Hi"}]
    assert [m["role"] for m in ex[3].messages] == ["system", "user", "assistant", "user"]
    assert ex[4].meta == {"task": "greet"}


def test_trl_sharegpt_alpaca_formats_in_every_file_kind(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    _check_trl_examples(D.load_examples(write_jsonl(tmp_path / "d.jsonl", TRL_RECORDS)))
    # JSON lines saved as .json (datasets' to_json writes that), and a JSON array
    write_jsonl(tmp_path / "lines.json", TRL_RECORDS)
    _check_trl_examples(D.load_examples(tmp_path / "lines.json"))
    (tmp_path / "arr.json").write_text(json.dumps(TRL_RECORDS))
    _check_trl_examples(D.load_examples(tmp_path / "arr.json"))
    # parquet and a save_to_disk directory hold one schema per file: one format each
    chats = [r for r in TRL_RECORDS if "conversations" in r] * 2
    pq.write_table(pa.Table.from_pylist(chats), str(tmp_path / "c.parquet"))
    ex = D.load_examples(tmp_path / "c.parquet")
    assert [e.response for e in ex] == ["3", "3"] and ex[0].messages[2] == {"role": "assistant", "content": "Bo"}
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}] * 3).save_to_disk(str(tmp_path / "ds"))
    ex = D.load_examples(tmp_path / "ds")
    assert len(ex) == 3 and ex[0].raw_prompt == "a" and ex[0].response == "b"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "x y"}])}).save_to_disk(str(tmp_path / "dd"))
    assert D.load_examples(tmp_path / "dd")[0].response == "x y"
    (tmp_path / "t.csv").write_text("text\nhello there\n")
    assert D.load_examples(tmp_path / "t.csv")[0].response == "hello there"
    (tmp_path / "plain").mkdir()
    with pytest.raises(D.DataError, match="not a datasets directory"):
        D.load_examples(tmp_path / "plain")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(D.DataError, match=r"bad\.parquet: not a readable parquet file"):
        D.load_examples(tmp_path / "bad.parquet")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(D.DataError, match=r"latin1\.jsonl: not UTF-8 text"):
        D.load_examples(tmp_path / "latin1.jsonl")


def test_hub_dataset_name_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(D.DataError, match="nobody-xyz/no-such-set: not a local data file.*HF_HUB_OFFLINE"):
        D.load_examples("nobody-xyz/no-such-set")


@pytest.mark.parametrize("template", [False, True])
def test_every_assistant_turn_is_trained(template, tok, chat_tok):
    t = chat_tok if template else tok
    ex = D.parse_record({"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Bo"},
                                      {"role": "user", "content": "Age?"}, {"role": "assistant", "content": "33"}]}, "x")
    f = D.encode_example(ex, t)
    trained = t.decode([i for i, lab in zip(f["input_ids"], f["labels"]) if lab != D.IGNORE_INDEX])
    assert "Bo" in trained and "33" in trained and "Name?" not in trained and "Age?" not in trained
    # the whole sequence is the rendered conversation, and the final answer follows n_prompt tokens
    assert t.decode(f["input_ids"][f["n_prompt"]:], skip_special_tokens=True).strip() == "33"
    last_only = D.encode_example(ex, t, all_turns=False)
    assert last_only["input_ids"] == f["input_ids"]
    assert t.decode([i for i, lab in zip(last_only["input_ids"], last_only["labels"])
                     if lab != D.IGNORE_INDEX], skip_special_tokens=True).strip() == "33"


def test_single_turn_encoding_is_prompt_then_target(tok, chat_tok):
    """One assistant turn: exactly the prompt tokens (masked) and the target tokens (trained), as before."""
    for t in (tok, chat_tok):
        ex = D.parse_record({"instruction": "Sort.", "input": "b, a", "output": "a, b"}, "x")
        prompt, target = D.prompt_and_target_text(ex, t)
        f = D.encode_example(ex, t)
        src = D.encode_prompt(ex.messages, t)
        assert f["input_ids"][:len(src)] == src and f["n_prompt"] == len(src)
        assert f["labels"] == [D.IGNORE_INDEX] * len(src) + f["input_ids"][len(src):]
        assert t.decode(f["input_ids"][len(src):]) == target


def test_text_and_completion_records_use_no_template(chat_tok):
    ex = D.parse_record({"prompt": "2+2=", "completion": "4"}, "x")
    f = D.encode_example(ex, chat_tok)
    assert "<|im_start|>" not in chat_tok.decode(f["input_ids"])
    assert chat_tok.decode(f["input_ids"][f["n_prompt"]:]) == "4" + chat_tok.eos_token
    t = D.encode_example(D.parse_record({"text": "abc"}, "x"), chat_tok)
    assert [i for i in t["labels"] if i != D.IGNORE_INDEX] == t["input_ids"][t["n_prompt"]:]
    assert chat_tok.decode(t["input_ids"][t["n_prompt"]:]) == "abc" + chat_tok.eos_token
