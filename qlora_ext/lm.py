"""Causal-LM computations shared by the trainer and the CLI: the answer-token loss (LM head applied to the
labelled positions only, in vocabulary-sized chunks), batched generation, and evaluation (held-out loss,
perplexity and exact match of greedy answers, computed from one forward pass over prompt + answer).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import types
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example, collate, encode_all, pad_id
from .nn import Linear4bit

# Model types whose CausalLM is decoder -> lm_head with nothing in between (no logit scaling or soft-capping),
# so the head may be applied to chosen positions only. Others run their full forward.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "olmo", "olmo2",
                          "smollm3", "starcoder2", "stablelm", "glm", "glm4", "helium", "arcee", "exaone4", "seed_oss",
                          "apertus"}
# Elements of [rows, vocab] float32 logits alive at once in the chunked head (30 MiB). Under glibc's 32 MiB
# ceiling for heap allocations, so chunks reuse freed heap memory: 64 MiB chunks were mapped and faulted in
# afresh each time and left ~200 MiB more peak RSS in a SmolLM2 training step. Much smaller chunks cost time:
# the GEMM re-packs the whole head weight per chunk (SmolLM2 head, 1023 rows: 0.93 s at 341-row chunks,
# 1.0 s at 158, 1.25 s at 85, forward + backward on 2 cores).
HEAD_CHUNK_ELEMENTS = (30 << 20) // 4


def plain_head(model) -> bool:
    cfg = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (getattr(cfg, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and hasattr(model, "model")
            and isinstance(head, torch.nn.Linear) and not isinstance(head, Linear4bit))  # a float head only


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i) over the rows whose label is not `ignore_index`, for a frozen head W, in
    chunks of rows: each chunk's logits, softmax and gradient with respect to h are computed together and
    dropped, so no [tokens, vocab] float32 tensor outlives a chunk (the plain path keeps logits, log-softmax and
    their gradient, three of them). The gradient for h is exact: (softmax(logits) - onehot(y)) @ W, stored
    for backward ([tokens, hidden], small). `logits_out` ([tokens, vocab], optional): the logits are also
    written there (no graph), for callers that must return them."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, logits_out=None, ignore_index=-100):
        rows = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], rows):
            if logits_out is not None:
                chunk = logits_out[i:i + rows]
                torch.mm(h[i:i + rows], weight.t(), out=chunk)
                if bias is not None:
                    chunk += bias
                logits = chunk.float()
            else:
                logits = F.linear(h[i:i + rows], weight, bias).float()
            y = labels[i:i + rows]
            valid = y != ignore_index
            y = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += torch.where(valid, lse - logits.gather(1, y[:, None]).squeeze(1), 0.0).sum()
            if need_grad:
                # softmax, in place of the chunk's own logits (a fresh tensor when they are the caller's)
                p = torch.exp(logits.sub_(lse[:, None]) if logits_out is None or logits is not chunk
                              else logits - lse[:, None])
                p[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                p.mul_(valid[:, None])
                grad_h[i:i + rows] = p.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_h if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None, None


def _frozen_linear(head) -> bool:
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def head_cross_entropy(head: torch.nn.Linear, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies of head(h) against labels, float32; chunked when the head is frozen."""
    if _frozen_linear(head):  # a 16-bit head (prepare_model_for_training's embedding_dtype) takes 16-bit input
        return _ChunkedHeadCrossEntropy.apply(h.to(head.weight.dtype), head.weight, head.bias, labels)
    return F.cross_entropy(head(h).float(), labels, reduction="sum")


def _chunked_causal_lm_forward(self, input_ids=None, *args, labels=None, **kwargs):
    """transformers' CausalLM forward with `labels`, for the PLAIN_HEAD_MODEL_TYPES and a frozen float head
    (installed by prepare_model_for_training): the decoder, then the loss through _ChunkedHeadCrossEntropy,
    so the full-vocabulary logits exist once (returned, without a graph: the loss carries the gradient)
    instead of three times (logits, log-softmax and their gradient). Same loss as transformers' (labels
    shifted inside, or `shift_labels`; `ignore_index`; mean over the labelled tokens, or sum /
    `num_items_in_batch`). Anything else (no labels, positional arguments past input_ids, `logits_to_keep`,
    `return_dict=False`, a trainable or quantized head) runs the original forward."""
    head = self.get_output_embeddings()
    if (labels is None or args or not plain_head(self) or not _frozen_linear(head)
            or kwargs.get("return_dict", True) is False or kwargs.get("logits_to_keep", 0) not in (0, None)):
        return self._qlora_ext_forward(input_ids, *args, labels=labels, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    kwargs.pop("logits_to_keep", None)
    out = self.model(input_ids=input_ids, **kwargs)
    h = out.last_hidden_state
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    y = shift_labels.reshape(-1).to(h.device)
    vocab = head.weight.shape[0]
    logits = torch.empty(h.shape[:-1].numel(), vocab, dtype=head.weight.dtype, device=h.device)
    total = _ChunkedHeadCrossEntropy.apply(h.reshape(-1, h.shape[-1]).to(head.weight.dtype), head.weight, head.bias, y, logits,
                                           ignore_index)
    if num_items is None:
        loss = total / (y != ignore_index).sum()
    else:
        loss = total / (num_items.to(total.device) if torch.is_tensor(num_items) else num_items)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    extra = {k: v for k, v in out.items() if k in fields and k not in ("loss", "logits")}
    return CausalLMOutputWithPast(loss=loss, logits=logits.view(*h.shape[:-1], vocab), **extra)


# named "forward": a pickled model (bound methods pickle by name) then reloads with transformers' forward,
# unchunked but working
_chunked_causal_lm_forward.__name__ = "forward"


def install_chunked_loss(model) -> bool:
    """Routes the model's forward with `labels` through the chunked head loss (see _chunked_causal_lm_forward);
    True when installed (a supported model family with a float head), idempotent."""
    if not plain_head(model) or "_qlora_ext_forward" in vars(model):
        return "_qlora_ext_forward" in vars(model)
    model._qlora_ext_forward = model.forward
    model.forward = types.MethodType(_chunked_causal_lm_forward, model)
    return True


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (each row's first real token is position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_loss(model, batch: Dict[str, torch.Tensor]):
    """(sum of next-token cross-entropies over the labelled positions, number of them), float32."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    # packed rows (qlora_ext.train.data.pack): position ids restarting per example and no 2-D mask, from which
    # transformers builds a block-diagonal causal mask (each example attends to itself only)
    kw = ({"position_ids": batch["position_ids"], "attention_mask": None} if "position_ids" in batch
          else {"attention_mask": batch["attention_mask"]})
    if plain_head(model):
        hidden = model.model(input_ids=batch["input_ids"], use_cache=False, **kw).last_hidden_state[:, :-1]
        return head_cross_entropy(model.get_output_embeddings(), hidden[mask], labels[mask]), int(mask.sum())
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits[:, :-1][mask]
    return F.cross_entropy(logits.float(), labels[mask], reduction="sum"), int(mask.sum())


def _eos_ids(model, tokenizer) -> List[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen])
    ids.discard(None)
    return sorted(int(i) for i in ids)


def _left_pad(seqs: Sequence[List[int]], pad: int):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[List[int]], max_new_tokens, device, batch_size: int = 32,
             temperature: float = 0.0) -> List[str]:
    """Decoded continuations of token-id prompts (greedy unless temperature > 0) via transformers' generate,
    batched with left padding. `max_new_tokens`: one int, or one per prompt."""
    was_training = model.training
    model.eval()
    pad = pad_id(tokenizer)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: List[Optional[str]] = [None] * len(prompts)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        ids, mask = _left_pad([prompts[i] for i in idx], pad)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max(limits[i] for i in idx), pad_token_id=pad,
                  eos_token_id=_eos_ids(model, tokenizer) or None)
        kw.update(temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
            kw.update(temperature=None, top_p=None, top_k=None)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, ids.shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return out


def exact_match(generated: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace (the answers are short, their format is part of them)."""
    return generated.strip() == reference.strip()


def _cache_of(out):
    cache = getattr(out, "cache", None)   # (a Cache may define __len__: no truthiness tests)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _crop_cache(cache, keep: int) -> bool:
    """Cut a KV cache back to its first `keep` positions; False when this cache type cannot."""
    try:
        cache.crop(keep - cache.get_seq_length())   # transformers >= 5: minus the number of tokens to drop
    except (AttributeError, ValueError, RuntimeError, NotImplementedError, TypeError):
        return False
    return cache.get_seq_length() == keep


@torch.no_grad()
def _loss_and_greedy(model, prompts, targets, limits, eos: List[int], pad: int, device):
    """For one batch: the summed answer-token loss, and greedy answers, from ONE forward over
    [left pad | prompt | answer | right pad]: the answer positions give the teacher-forced loss, the last
    prompt position gives the first greedy token, and the KV cache cut back to the prompts continues the
    greedy decoding. Returns (loss sum, token count, generated ids per row) or None if the cache cannot be cut."""
    n = len(prompts)
    pids, pmask = _left_pad(prompts, pad)
    width, tlen = pids.shape[1], max(len(t) for t in targets)
    tids = torch.full((n, tlen), pad, dtype=torch.long)
    tmask = torch.zeros((n, tlen), dtype=torch.long)
    for row, t in enumerate(targets):
        tids[row, :len(t)] = torch.tensor(t, dtype=torch.long)
        tmask[row, :len(t)] = 1
    ids = torch.cat([pids, tids], 1).to(device)
    mask = torch.cat([pmask, tmask], 1).to(device)
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
    hidden, cache = out.last_hidden_state, _cache_of(out)
    head = model.get_output_embeddings()
    # position j predicts token j + 1: answer tokens sit at width .. width + tlen - 1
    h = hidden[:, width - 1:width - 1 + tlen]
    sel = tmask.bool().to(device)
    loss = F.cross_entropy(head(h[sel]).float(), tids.to(device)[sel], reduction="sum")
    if cache is None or not _crop_cache(cache, width):
        return None
    # transformers 5.2x renamed the decoder's `past_key_values` argument and output to `cache`
    cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    eos_t = torch.tensor(eos, device=device) if eos else None
    token = head(hidden[:, width - 1]).argmax(-1)
    gen = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    lens = pmask.sum(1).to(device)
    limit = torch.tensor(limits, device=device)
    cur_mask = pmask.to(device)
    for step in range(max(limits)):
        is_eos = torch.isin(token, eos_t) if eos_t is not None else torch.zeros_like(done)
        for row in range(n):
            if not done[row] and not is_eos[row]:
                gen[row].append(int(token[row]))
        done |= is_eos | (limit <= step + 1)
        if bool(done.all()):
            break
        cur_mask = torch.cat([cur_mask, torch.ones((n, 1), dtype=cur_mask.dtype, device=device)], 1)
        step_out = model.model(input_ids=token[:, None], attention_mask=cur_mask,
                               position_ids=(lens + step)[:, None], use_cache=True, **{cache_kw: cache})
        cache = _cache_of(step_out)
        token = head(step_out.last_hidden_state[:, -1]).argmax(-1)
    return float(loss), int(sel.sum()), gen


def evaluate(model, tokenizer, examples: Sequence[Example], device, source_max_len: int = 1024,
             target_max_len: int = 256, batch_size: int = 32, with_generation: bool = True) -> Dict:
    """Held-out loss and perplexity over the answer tokens, and strict exact match of greedy answers: an
    answer counts only when the generated text, stripped of surrounding whitespace, equals the reference;
    generation stops at end-of-sequence or after twice the reference's length + 16 tokens, at most
    target_max_len (not at the reference's length, so an answer that goes on cannot match). Overall and per task (records with a 'task' field); records without an
    answer to check (`text` records) count in the loss only."""
    was_training = model.training
    model.eval()
    feats = encode_all(examples, tokenizer, source_max_len, target_max_len, all_turns=False)
    prompts = [f["input_ids"][:f["n_prompt"]] for f in feats]
    targets = [f["input_ids"][f["n_prompt"]:] for f in feats]
    pad, eos = pad_id(tokenizer), _eos_ids(model, tokenizer)
    # generous: an answer still going after twice the reference's length + 16 tokens cannot equal it
    limits = [min(target_max_len, 2 * len(t) + 16) if e.checkable else 1 for t, e in zip(targets, examples)]
    order = sorted(range(len(examples)), key=lambda i: len(feats[i]["input_ids"]))
    total, count = 0.0, 0
    answers: List[Optional[str]] = [None] * len(examples)
    shared = plain_head(model) and with_generation
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        res = _loss_and_greedy(model, [prompts[i] for i in idx], [targets[i] for i in idx],
                               [limits[i] for i in idx], eos, pad, device) if shared else None
        if res is None:   # separate passes: teacher-forced loss, then transformers' generate
            shared = False
            batch = {n: t.to(device) for n, t in collate([feats[i] for i in idx], pad).items()}
            with torch.no_grad():
                s, c = token_loss(model, batch)
            total, count = total + float(s), count + c
            if with_generation:
                texts = generate(model, tokenizer, [prompts[i] for i in idx], [limits[i] for i in idx], device,
                                 batch_size=len(idx))
                for i, t in zip(idx, texts):
                    answers[i] = t
            continue
        s, c, gen = res
        total, count = total + s, count + c
        for i, g in zip(idx, gen):
            answers[i] = tokenizer.decode(g, skip_special_tokens=True)
    model.train(was_training)
    loss = total / max(count, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": len(examples)}
    if not with_generation:
        return result
    checked = [(a, e) for a, e in zip(answers, examples) if e.checkable]
    hits = [exact_match(a, e.response) for a, e in checked]
    result["exact_match"] = sum(hits) / len(hits) if hits else None
    tasks: Dict[str, List[bool]] = {}
    for (_, e), h in zip(checked, hits):
        if "task" in e.meta:
            tasks.setdefault(str(e.meta["task"]), []).append(h)
    if tasks:
        result["per_task"] = {t: sum(v) / len(v) for t, v in sorted(tasks.items())}
    result["samples"] = [{"prompt": e.messages[-1]["content"], "reference": e.response, "generated": a}
                         for e, a in list(zip(examples, answers))[:5]]
    return result
