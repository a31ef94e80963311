"""Instruction data for fine-tuning: load records in the formats practitioners have (TRL's `text`,
`prompt` + `completion` and `messages`; ShareGPT `conversations`; Alpaca `instruction` / `input` / `output`)
from .jsonl / .json (an array or JSON lines) / .csv / .parquet files, a `datasets` directory written by
save_to_disk, or a Hub dataset name (when online), validated with errors naming file, line and field; turn
them into token ids with the loss on the answers only (every assistant turn of a chat), and batch them
deterministically (optionally grouped by length) so a run can resume at an exact position.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100
# "dataset/", not "data/": a data/ directory beside this data.py module would be a confusing name clash
DATA_DIR = pathlib.Path(__file__).resolve().parent / "dataset"
DEFAULT_TRAIN = DATA_DIR / "train.jsonl"
DEFAULT_HELDOUT = DATA_DIR / "heldout.jsonl"
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
# Role names used by OpenAssistant / ShareGPT-style exports, mapped onto the chat-template roles.
ROLE_ALIASES = {"prompter": "user", "human": "user", "gpt": "assistant", "chatgpt": "assistant"}
HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ValueError):
    """A malformed data file or record; the message starts with 'file:line:' and names the field."""


@dataclass
class Example:
    """One training example: the conversation up to the answer (earlier assistant turns included, and trained
    on too), and the answer to learn / to match. `raw_prompt` is set for records in plain text (TRL's
    prompt + completion, and `text`, whose prompt is empty): no chat template is applied to them."""
    messages: List[Dict[str, str]]
    response: str
    meta: Dict[str, object] = field(default_factory=dict)
    raw_prompt: Optional[str] = None

    @property
    def checkable(self) -> bool:
        """Has an answer to an instruction that exact match can check (a `text` record has none)."""
        return self.raw_prompt != ""


# ---------------------------------------------------------------------------------------------------------
# loading


def load_examples(path) -> List[Example]:
    """Read `path` into Examples: a file (.jsonl, .json as an array or JSON lines, .csv, .parquet, chosen by
    extension), a `datasets` directory written by save_to_disk, or a Hub dataset name (its train split; needs
    network unless cached). Raise DataError on the first malformed record (file, line and field in the
    message) or when there are no records."""
    path = pathlib.Path(path)
    ext = path.suffix.lower()
    if path.is_dir():
        rows = _read_dataset_dir(path)
    elif ext not in EXTENSIONS and not path.exists() and HUB_DATASET.match(str(path)):
        rows = _read_hub(str(path))
    elif ext not in EXTENSIONS:
        raise DataError(f"{path}: unsupported data file extension {ext or '(none)'!r}; "
                        f"use one of {', '.join(EXTENSIONS)}, a datasets directory or a Hub dataset name")
    elif not path.is_file():
        raise DataError(f"{path}: no such data file")
    elif ext == ".jsonl":
        rows = _read_jsonl(path)
    elif ext == ".json":
        rows = _read_json(path)
    elif ext == ".parquet":
        rows = _read_parquet(path)
    else:
        rows = _read_csv(path)
    try:
        examples = [parse_record(rec, f"{path}:{where}") for where, rec in rows]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
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
    """A JSON array of records, or JSON lines saved as .json (what datasets' to_json writes)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and not text.lstrip().startswith("["):
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):   # one line of JSON lines
        yield "1", data
        return
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON array of records (or JSON lines), got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"record {i}", rec


CSV_COLUMNS = (("instruction", "output"), ("text",), ("prompt", "completion"))


def _read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}:1: empty CSV (a header with instruction,input,output is required)")
        if not any(all(c in reader.fieldnames for c in cols) for cols in CSV_COLUMNS):
            raise DataError(f"{path}:1: CSV header has no 'instruction' column and 'output' (Alpaca), nor 'text', "
                            f"nor 'prompt' and 'completion' (found {reader.fieldnames})")
        for rec in reader:
            if None in rec:  # more cells than header columns
                raise DataError(f"{path}:{reader.line_num}: more cells than header columns")
            yield f"{reader.line_num}", rec


def _plain(value):
    """numpy / pyarrow values from parquet and datasets rows as plain Python (lists of dicts, str, ...)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_parquet(path):
    from .errors import require
    pq = require("pyarrow.parquet", "pyarrow", "reading .parquet data")
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) and OSError subclasses
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"row {i}", _plain(rec)


def _split_of(ds, where):
    if hasattr(ds, "keys") and not hasattr(ds, "column_names") or isinstance(getattr(ds, "column_names", None), dict):
        splits = list(ds.keys())
        if "train" not in splits:
            raise DataError(f"{where}: a dataset dict without a 'train' split (splits: {splits})")
        ds = ds["train"]
    return ds


def _read_dataset_dir(path):
    if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: a directory, but not a datasets directory written by save_to_disk")
    from .errors import require
    datasets = require("datasets", "datasets", "reading a datasets directory")
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"{path}: cannot load the datasets directory ({str(exc).splitlines()[0]})") from None
    for i, rec in enumerate(_split_of(ds, path)):
        yield f"row {i}", _plain(rec)


def _read_hub(name):
    """A Hub dataset's train split; one-line errors offline or when it does not exist."""
    from .errors import require
    datasets = require("datasets", "datasets", f"loading the Hub dataset {name}")
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # datasets raises many types (offline, not found, no train split, network)
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                      for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = "not in the local cache and HF_HUB_OFFLINE is set" if offline else why
        raise DataError(f"{name}: not a local data file, and the Hub dataset cannot be loaded ({hint})") from None
    for i, rec in enumerate(ds):
        yield f"row {i}", _plain(rec)


def parse_record(rec, where: str) -> Example:
    """One record, in the first format its keys match:
      {"messages": [{"role", "content"}...]}          chat (TRL conversational), ending with an assistant turn
      {"conversations": [{"from", "value"}...]}       ShareGPT (human / gpt / system)
      {"prompt", "completion"}                        TRL prompt-completion: plain strings, or message lists
      {"text"}                                        TRL language modelling: loss on the whole text
      {"instruction", "input"?, "output"}             Alpaca
    Other keys are kept as metadata."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    if "messages" in rec:
        return _parse_chat(rec, "messages", where)
    if "conversations" in rec:
        return _parse_chat(rec, "conversations", where)
    if "prompt" in rec or "completion" in rec:
        return _parse_prompt_completion(rec, where)
    if "text" in rec and "instruction" not in rec:
        text = _text_field(rec, "text", where, required=True)
        return Example([], text, {k: v for k, v in rec.items() if k != "text"}, raw_prompt="")
    if "instruction" not in rec and "output" not in rec:
        raise DataError(f"{where}: record has none of 'messages', 'conversations', 'prompt'/'completion', 'text', "
                        f"'instruction'/'output'; keys: {sorted(rec)}")
    instruction = _text_field(rec, "instruction", where, required=True)
    inp = _text_field(rec, "input", where, required=False)
    output = _text_field(rec, "output", where, required=True)
    content = instruction + ("\n" + inp if inp.strip() else "")
    meta = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output")}
    return Example([{"role": "user", "content": content}], output, meta)


def _parse_prompt_completion(rec, where) -> Example:
    meta = {k: v for k, v in rec.items() if k not in ("prompt", "completion")}
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):   # conversational prompt-completion
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise DataError(f"{where}: field 'prompt'/'completion': both message lists or both strings")
        ex = _parse_chat({"messages": prompt + completion}, "messages", where)
        ex.meta = meta
        return ex
    prompt = _text_field(rec, "prompt", where, required=False)
    if "prompt" not in rec:
        raise DataError(f"{where}: field 'prompt': missing")
    completion = _text_field(rec, "completion", where, required=True)
    return Example([{"role": "user", "content": prompt}], completion, meta, raw_prompt=prompt)


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


def _parse_chat(rec, key, where) -> Example:
    msgs = rec[key]
    sharegpt = key == "conversations"
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field '{key}': expected a non-empty list of {{{role_key}, {content_key}}} objects")
    out = []
    for i, m in enumerate(msgs):
        f = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{f}': expected an object with '{role_key}' and '{content_key}'")
        role, content = m.get(role_key), m.get(content_key)
        if not isinstance(role, str):
            raise DataError(f"{where}: field '{f}.{role_key}': missing or not a string")
        role = ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            raise DataError(f"{where}: field '{f}.{role_key}': {m[role_key]!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{f}.{content_key}': missing or not a string")
        out.append({"role": role, "content": content})
    last = len(out) - 1
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{key}[{last}].{role_key}': the last message must be the "
                        f"assistant's answer, got {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise DataError(f"{where}: field '{key}[{last}].{content_key}': empty answer")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise DataError(f"{where}: field '{key}': no user message before the answer")
    meta = {k: v for k, v in rec.items() if k != key}
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
    """(prompt text, target text). Plain-text records: their prompt as is, the answer + EOS. With a chat
    template the target is the rest of the rendered conversation after the prompt, so it ends with the
    template's end-of-turn marker; otherwise the answer + EOS."""
    if example.raw_prompt is not None:
        return example.raw_prompt, example.response + (tokenizer.eos_token or "")
    prompt = render_prompt(example.messages, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            example.messages + [{"role": "assistant", "content": example.response}], tokenize=False)
        if full.startswith(prompt) and example.response in full[len(prompt):]:
            return prompt, full[len(prompt):]
        # templates that rewrite earlier turns once an answer follows: answer + EOS after the prompt
    return prompt, example.response + (tokenizer.eos_token or "")


def _render_turns(messages, tokenizer) -> str:
    """The conversation `messages` (ending with an assistant turn) as the model sees it, without a generation
    prompt after it."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return render_prompt(messages[:-1], tokenizer) + messages[-1]["content"] + "\n\n"


def conversation_segments(example: Example, tokenizer) -> List[Tuple[str, bool]]:
    """[(text, is an assistant turn)] covering the whole example, ending with the answer (the target of
    prompt_and_target_text). Every earlier assistant turn is its own trained segment when the rendering allows
    (each rendering of a prefix of the conversation extends the previous one); otherwise the history is one
    untrained prompt, as for a single turn."""
    prompt, target = prompt_and_target_text(example, tokenizer)
    msgs = example.messages
    if example.raw_prompt is not None or not any(m["role"] == "assistant" for m in msgs):
        return [(prompt, False), (target, True)]
    segs, done = [], ""
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        try:
            before, after = render_prompt(msgs[:k], tokenizer), _render_turns(msgs[:k + 1], tokenizer)
        except Exception:  # noqa: BLE001 - a template that cannot render a partial conversation (jinja errors)
            return [(prompt, False), (target, True)]
        if not (before.startswith(done) and after.startswith(before) and m["content"] in after[len(before):]):
            return [(prompt, False), (target, True)]
        segs += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    if not prompt.startswith(done):
        return [(prompt, False), (target, True)]
    return segs + [(prompt[len(done):], False), (target, True)]


def encode_prompt(messages: List[Dict[str, str]], tokenizer, source_max_len: int = 1024) -> List[int]:
    """Token ids of the prompt alone (for generation), truncated like in encode_example."""
    return _tokenize(tokenizer, render_prompt(messages, tokenizer), first=True)[-source_max_len:]


def _tokenize(tokenizer, text, first, raw=False):
    # Chat templates already spell out BOS and the special markers; the Alpaca fallback and plain-text records
    # need BOS added.
    add = first and (raw or not getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=add)["input_ids"] if text or add else []


def encode_example(example: Example, tokenizer, source_max_len: int = 1024, target_max_len: int = 256,
                   train_on_source: bool = False, all_turns: bool = True) -> Dict[str, List[int]]:
    """input_ids and labels for one example, plus n_prompt (the tokens before the final answer). The context
    before the final answer keeps its LAST source_max_len tokens (its end holds the assistant header the
    answer must follow); the answer keeps its first target_max_len. Labels are IGNORE_INDEX except on the
    answer and, with all_turns, on every earlier assistant turn (or everywhere with train_on_source)."""
    if source_max_len < 1 or target_max_len < 1:
        raise ValueError(f"source_max_len and target_max_len must be >= 1, got {source_max_len}, "
                         f"{target_max_len}")
    segs = conversation_segments(example, tokenizer)
    raw = example.raw_prompt is not None
    src, src_labels = [], []
    for n, (text, trained) in enumerate(segs[:-1]):
        ids = _tokenize(tokenizer, text, first=n == 0, raw=raw)
        src += ids
        src_labels += ids if (train_on_source or (trained and all_turns)) else [IGNORE_INDEX] * len(ids)
    src, src_labels = src[len(src) - source_max_len:] if len(src) > source_max_len else src, \
        src_labels[len(src_labels) - source_max_len:] if len(src_labels) > source_max_len else src_labels
    tgt = _tokenize(tokenizer, segs[-1][0], first=len(segs) == 1, raw=raw)[:target_max_len]
    return {"input_ids": list(src) + list(tgt), "labels": list(src_labels) + list(tgt), "n_prompt": len(src)}


def encode_all(examples, tokenizer, source_max_len=1024, target_max_len=256, train_on_source=False,
               all_turns=True):
    return [encode_example(e, tokenizer, source_max_len, target_max_len, train_on_source, all_turns)
            for e in examples]


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
