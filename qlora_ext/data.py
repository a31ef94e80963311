"""Instruction data for fine-tuning: load Alpaca-style or chat records (jsonl / json / csv, validated with
errors naming file, line and field), turn them into token ids with the prompt masked out of the loss, and
batch them deterministically (optionally grouped by length) so a run can resume at an exact position.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
import random
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

IGNORE_INDEX = -100
# "dataset/", not "data/": a data/ directory beside this data.py module would be a confusing name clash
DATA_DIR = pathlib.Path(__file__).resolve().parent / "dataset"
DEFAULT_TRAIN = DATA_DIR / "train.jsonl"
DEFAULT_HELDOUT = DATA_DIR / "heldout.jsonl"
EXTENSIONS = (".jsonl", ".json", ".csv")
ROLES = ("system", "user", "assistant")
# Role names used by OpenAssistant / ShareGPT-style exports, mapped onto the chat-template roles.
ROLE_ALIASES = {"prompter": "user", "human": "user", "gpt": "assistant"}


class DataError(ValueError):
    """A malformed data file or record; the message starts with 'file:line:' and names the field."""


@dataclass
class Example:
    """One training example: the conversation up to the answer, and the answer to learn / to match."""
    messages: List[Dict[str, str]]
    response: str
    meta: Dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# loading


def load_examples(path) -> List[Example]:
    """Read `path` (.jsonl, .json or .csv, chosen by extension) into Examples; raise DataError on the first
    malformed record (file, line and field in the message) or on an empty file."""
    path = pathlib.Path(path)
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{path}: unsupported data file extension {ext or '(none)'!r}; "
                        f"use one of {', '.join(EXTENSIONS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if ext == ".jsonl":
        rows = _read_jsonl(path)
    elif ext == ".json":
        rows = _read_json(path)
    else:
        rows = _read_csv(path)
    examples = [parse_record(rec, f"{path}:{where}") for where, rec in rows]
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _read_json(path):
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"record {i}", rec


def _read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}:1: empty CSV (a header with instruction,input,output is required)")
        for col in ("instruction", "output"):
            if col not in reader.fieldnames:
                raise DataError(f"{path}:1: CSV header has no '{col}' column (found {reader.fieldnames})")
        for rec in reader:
            if None in rec:  # more cells than header columns
                raise DataError(f"{path}:{reader.line_num}: more cells than header columns")
            yield f"{reader.line_num}", rec


def parse_record(rec, where: str) -> Example:
    """One record: {"instruction", "input"?, "output"} (Alpaca) or {"messages": [{"role", "content"}...]}
    ending with an assistant turn (chat). Other keys are kept as metadata."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    if "messages" in rec:
        return _parse_chat(rec, where)
    if "instruction" not in rec and "output" not in rec:
        raise DataError(f"{where}: record has neither 'instruction'/'output' (Alpaca) nor 'messages' (chat); "
                        f"keys: {sorted(rec)}")
    instruction = _text_field(rec, "instruction", where, required=True)
    inp = _text_field(rec, "input", where, required=False)
    output = _text_field(rec, "output", where, required=True)
    content = instruction + ("\n" + inp if inp.strip() else "")
    meta = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output")}
    return Example([{"role": "user", "content": content}], output, meta)


def _text_field(rec, key, where, required):
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"{where}: field '{key}': missing")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{key}': empty")
    return value


def _parse_chat(rec, where) -> Example:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages': expected a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{f}': expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise DataError(f"{where}: field '{f}.role': missing or not a string")
        role = ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            raise DataError(f"{where}: field '{f}.role': {m['role']!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{f}.content': missing or not a string")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages[{len(out) - 1}].role': the last message must be the "
                        f"assistant's answer, got {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise DataError(f"{where}: field 'messages[{len(out) - 1}].content': empty answer")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise DataError(f"{where}: field 'messages': no user message before the answer")
    meta = {k: v for k, v in rec.items() if k != "messages"}
    return Example(out[:-1], out[-1]["content"], meta)


def split_heldout(examples: Sequence[Example], seed: int, fraction: float = 0.1, max_size: int = 200):
    """Deterministically split off a held-out set (for user data given without --eval-data)."""
    if len(examples) < 2:
        raise DataError("need at least 2 records to split off a held-out set (or pass eval data)")
    n = max(1, min(max_size, int(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------------------------------------------------
# tokenization


def render_prompt(messages: List[Dict[str, str]], tokenizer) -> str:
    """The text the model continues to answer `messages`: the chat template with the assistant's header, or
    without a template the Alpaca layout (the format the QLoRA paper trained on)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"### Response:\n{m['content']}\n\n")
        elif m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        else:
            parts.append(f"### Instruction:\n{m['content']}\n\n")
    return "".join(parts) + "### Response:\n"


def prompt_and_target_text(example: Example, tokenizer):
    """(prompt text, target text). With a chat template the target is the rest of the rendered conversation
    after the prompt, so it ends with the template's end-of-turn marker; otherwise the answer + EOS."""
    prompt = render_prompt(example.messages, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            example.messages + [{"role": "assistant", "content": example.response}], tokenize=False)
        if full.startswith(prompt) and example.response in full[len(prompt):]:
            return prompt, full[len(prompt):]
        # templates that rewrite earlier turns once an answer follows: answer + EOS after the prompt
    return prompt, example.response + (tokenizer.eos_token or "")


def encode_prompt(messages: List[Dict[str, str]], tokenizer, source_max_len: int = 1024) -> List[int]:
    """Token ids of the prompt alone (for generation), truncated like in encode_example."""
    return _tokenize(tokenizer, render_prompt(messages, tokenizer), first=True)[-source_max_len:]


def _tokenize(tokenizer, text, first):
    # Chat templates already spell out BOS and the special markers; the Alpaca fallback needs BOS added.
    add = first and not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=add)["input_ids"]


def encode_example(example: Example, tokenizer, source_max_len: int = 1024, target_max_len: int = 256,
                   train_on_source: bool = False) -> Dict[str, List[int]]:
    """input_ids and labels for one example. The prompt keeps its LAST source_max_len tokens (its end holds
    the assistant header the answer must follow); the target keeps its first target_max_len. Labels are
    IGNORE_INDEX on the prompt unless train_on_source."""
    if source_max_len < 1 or target_max_len < 1:
        raise ValueError(f"source_max_len and target_max_len must be >= 1, got {source_max_len}, "
                         f"{target_max_len}")
    prompt, target = prompt_and_target_text(example, tokenizer)
    src = _tokenize(tokenizer, prompt, first=True)[-source_max_len:]
    tgt = _tokenize(tokenizer, target, first=False)[:target_max_len]
    labels = (list(src) if train_on_source else [IGNORE_INDEX] * len(src)) + list(tgt)
    return {"input_ids": list(src) + list(tgt), "labels": labels}


def encode_all(examples, tokenizer, source_max_len=1024, target_max_len=256, train_on_source=False):
    return [encode_example(e, tokenizer, source_max_len, target_max_len, train_on_source) for e in examples]


def pad_id(tokenizer) -> int:
    """The id used for padding (masked out everywhere): the tokenizer's pad token, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def collate(features: Sequence[Dict[str, List[int]]], pad: int) -> Dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------
# batching


class BatchPlan:
    """The deterministic order of batches: epoch e's batches are a pure function of (seed, e, lengths), so a
    position (epoch, index) identifies the next batch exactly, and resuming needs nothing else.

    With group_by_length, each epoch's shuffled indices are cut into megabatches of 50 batches, each sorted
    by length and cut into batches (little padding), and the batches are then shuffled (so the loss curve
    does not follow the length order). The last batch of an epoch may be smaller."""

    MEGABATCH = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length

    def __len__(self):
        return math.ceil(len(self.lengths) / self.batch_size)

    def epoch(self, e: int) -> List[List[int]]:
        rng = random.Random(f"{self.seed}:{e}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        bs = self.batch_size
        if self.group_by_length:
            mega = bs * self.MEGABATCH
            order = [i for k in range(0, len(order), mega)
                     for i in sorted(order[k:k + mega], key=lambda j: -self.lengths[j])]
        batches = [order[k:k + bs] for k in range(0, len(order), bs)]
        if self.group_by_length:
            rng.shuffle(batches)
        return batches
