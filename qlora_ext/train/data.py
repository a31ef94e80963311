"""A run's data: the train and held-out examples (qlora_ext.data reads and validates them), their token ids,
optionally packed several to a row, and the deterministic batch order a checkpoint's step number points into."""
from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

import torch

from ..data import (DEFAULT_HELDOUT, DEFAULT_TRAIN, IGNORE_INDEX, BatchPlan, Example, collate, encode_all,
                    load_examples, split_heldout)
from .setup import FinetuneConfig


def prepare_data(cfg: FinetuneConfig) -> Tuple[List[Example], List[Example]]:
    """(train examples, eval examples): the shipped dataset by default; user data is validated here."""
    train = load_examples(cfg.data or DEFAULT_TRAIN)
    if cfg.eval_data:
        heldout = load_examples(cfg.eval_data)
    elif cfg.data is None:
        heldout = load_examples(DEFAULT_HELDOUT)
    else:
        train, heldout = split_heldout(train, cfg.seed)
    if cfg.eval_samples and cfg.eval_samples < len(heldout):
        pick = sorted(random.Random(cfg.seed).sample(range(len(heldout)), cfg.eval_samples))
        heldout = [heldout[i] for i in pick]
    return train, heldout


def pack(features: Sequence[Dict[str, List[int]]], max_len: int, seed: int) -> List[Dict[str, List[int]]]:
    """Packing: examples (in a seeded order) concatenated into rows of at most `max_len` tokens, first fit in
    that order; each row carries position_ids that restart at 0 for every example, from which transformers
    builds a block-diagonal causal mask (no token attends to another example). An example longer than max_len
    fills a row alone (it is already truncated by source_max_len + target_max_len)."""
    order = list(range(len(features)))
    random.Random(f"pack:{seed}").shuffle(order)
    rows: List[Dict[str, List[int]]] = []
    cur = {"input_ids": [], "labels": [], "position_ids": []}
    for i in order:
        f = features[i]
        n = len(f["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_len:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += f["input_ids"]
        # the first token of an example is never a target of the previous one
        cur["labels"] += [IGNORE_INDEX] + list(f["labels"][1:])
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        rows.append(cur)
    return rows


def collate_rows(rows: Sequence[Dict[str, List[int]]], pad: int) -> Dict[str, torch.Tensor]:
    """collate() plus position_ids for packed rows (padding gets its own positions from 0: a separate
    'sequence' that no real token attends to, and no label)."""
    batch = collate(rows, pad)
    if "position_ids" in rows[0]:
        pos = torch.zeros_like(batch["input_ids"])
        for i, r in enumerate(rows):
            n = len(r["position_ids"])
            pos[i, :n] = torch.tensor(r["position_ids"])
            pos[i, n:] = torch.arange(pos.shape[1] - n)
        batch["position_ids"] = pos
    return batch


def training_rows(cfg: FinetuneConfig, examples: Sequence[Example], tokenizer) -> List[Dict[str, List[int]]]:
    feats = encode_all(examples, tokenizer, cfg.source_max_len, cfg.target_max_len, cfg.train_on_source)
    if cfg.packing:
        feats = pack(feats, cfg.source_max_len + cfg.target_max_len, cfg.seed)
    return feats


def batch_plan(cfg: FinetuneConfig, rows) -> BatchPlan:
    return BatchPlan([len(f["input_ids"]) for f in rows], cfg.batch_size, cfg.seed,
                     cfg.group_by_length and not cfg.packing)


def batch_at(plan: BatchPlan, micro: int) -> List[int]:
    """The micro-batch with global index `micro` (epochs follow each other)."""
    epoch, idx = divmod(micro, len(plan))
    return plan.epoch(epoch)[idx]
