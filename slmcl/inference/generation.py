"""Batched greedy generation and last-position scoring on a resident model, our own loop.

Generation dominates the protocol's cost, so the loop is ours rather than ``generate``:
prompts are sorted by length (little padding), batches are large, and a row that has
emitted a stop token (EOS or the template's end-of-turn) stops costing work, so a
multiple-choice row costs ~2 decode steps even when a math row beside it runs to the
token limit. The head every prompt of a task shares (template, instruction, preamble) is
fed once. Decoding is greedy, left-padded, with explicit position ids, so a batched row
gives the same tokens as the row alone. The stability pass uses the same prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slmcl.inference.decode_cache import KVSlots, num_layers, supports_slots
from slmcl.training.batching import length_batches


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # without the stop token
    hit_max_tokens: bool


MIN_SHARED_PREFIX = 16  # below this, a separate prefix pass costs more than it saves
# Prefill is compute-bound on a CPU (~500 tokens/s for SmolLM2-135M on 2 cores, at any
# batch), so a decode batch's prompts are prefilled in length-matched chunks of at most
# this many padded positions (padding would cost as much as real tokens), each chunk
# written straight into its rows of the decode batch, where batching is what pays.
PREFILL_TOKENS = 1024
PREFILL_TOKENS_ACCELERATOR = 16384  # a GPU prefers few wide forwards; padding is cheap there
PREFILL_OVERHEAD = 32  # a forward's fixed cost, in token-equivalents (~45 ms on 2 cores)
# A finished row stays in the batch (its output ignored) until this fraction of the rows
# has finished: moving the survivors costs about one step of every row, a dead row one
# row-step per step, so rows are dropped in bulk rather than one at a time.
COMPACT_WHEN_FINISHED = 0.25


def common_prefix_length(prompts: Sequence[list[int]]) -> int:
    """Tokens every prompt starts with (chat template, system prompt, instruction, task preamble),
    leaving at least one token of each prompt to feed after the shared part."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _left_padded(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@dataclass(frozen=True)
class _Head:
    """The head every prompt of one segment (a task's rows) starts with, fed once (``kv``: one row)."""

    length: int
    kv: KVSlots | None


class _SlotBatch:
    """A decode batch whose KV cache lives in ``KVSlots``, prefilled chunk by chunk into its rows.

    Row r holds, column by column: its segment's shared head, left padding (masked) up to
    the batch's longest prompt, the row's own tail, then one column per generated token.
    A prefill chunk is rows of one segment: the head's keys/values are copied into them,
    then only their tails are fed.
    """

    def __init__(self, model: Any, slots: KVSlots, chunks: Sequence[tuple[_Head, list[list[int]]]], *,
                 pad_id: int, device: torch.device, on_forward: Callable[[int], None] | None = None) -> None:
        self.model, self.slots = model, slots
        self.length = max(head.length + len(t) for head, tails in chunks for t in tails)  # filled columns
        logits = []
        last_pos = []
        r0 = 0
        for head, tails in chunks:
            ids, tail_mask = _left_padded(tails, pad_id, device)
            r1, past, shared = r0 + len(tails), self.length - ids.shape[1], head.length
            if head.kv is not None:
                slots.copy_head(head.kv, slice(r0, r1), shared)
            mask = slots.mask[r0:r1]
            mask[:, :shared] = 1
            mask[:, shared:past] = 0
            mask[:, past:self.length] = tail_mask
            positions = shared + (tail_mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask[:, :self.length], position_ids=positions,
                        past_key_values=slots.cache(slice(r0, r1), past), use_cache=True, logits_to_keep=1)
            if on_forward is not None:
                on_forward(r1 - r0)
            logits.append(out.logits[:, -1, :])
            last_pos.append(positions[:, -1])
            r0 = r1
        self.last_logits = torch.cat(logits)  # (rows, vocab): the next-token logits after each prompt
        self.next_tok, self.last_pos = self.last_logits.argmax(-1), torch.cat(last_pos)

    def step(self) -> None:
        n = self.next_tok.shape[0]
        self.slots.mask[:n, self.length] = 1
        self.last_pos = self.last_pos + 1
        out = self.model(input_ids=self.next_tok[:, None], attention_mask=self.slots.mask[:n, : self.length + 1],
                         position_ids=self.last_pos[:, None],
                         past_key_values=self.slots.cache(slice(0, n), self.length), use_cache=True)
        self.length += 1
        self.next_tok = out.logits[:, -1, :].argmax(-1)

    def compact(self, keep: list[int]) -> None:
        self.slots.compact(keep, self.length)
        idx = torch.tensor(keep, device=self.next_tok.device)
        self.next_tok, self.last_pos = self.next_tok[idx], self.last_pos[idx]


class _CacheBatch:
    """The general layout: the model's own cache (sliding-window or linear-attention layers), one prefill."""

    def __init__(self, model: Any, prompts: Sequence[list[int]], *, pad_id: int, device: torch.device) -> None:
        self.model = model
        ids, self.mask = _left_padded(prompts, pad_id, device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.last_logits = out.logits[:, -1, :]
        self.cache, self.next_tok, self.last_pos = out.past_key_values, self.last_logits.argmax(-1), positions[:, -1]

    def step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.last_pos = self.last_pos + 1
        out = self.model(input_ids=self.next_tok[:, None], attention_mask=self.mask,
                         position_ids=self.last_pos[:, None], past_key_values=self.cache, use_cache=True)
        self.cache, self.next_tok = out.past_key_values, out.logits[:, -1, :].argmax(-1)

    def compact(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.next_tok.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_tok, self.last_pos = self.mask[idx], self.next_tok[idx], self.last_pos[idx]


def _decode(batch: _SlotBatch | _CacheBatch, members: list[int], *, max_new_tokens: int, stop: torch.Tensor,
            results: list[Generation | None]) -> None:
    """Greedy steps until every row of the batch stopped; ``members[r]`` is the prompt of row r."""
    rows: list[int | None] = list(members)
    generated: dict[int, list[int]] = {i: [] for i in members}
    for step in range(max_new_tokens):
        finished = torch.isin(batch.next_tok, stop).tolist()
        for r, (i, tok, fin) in enumerate(zip(rows, batch.next_tok.tolist(), finished)):
            if i is None:
                continue
            if fin:
                results[i] = Generation(generated[i], hit_max_tokens=False)
                rows[r] = None
            else:
                generated[i].append(tok)
        live = [r for r, i in enumerate(rows) if i is not None]
        if not live or step == max_new_tokens - 1:
            break
        if len(rows) - len(live) >= COMPACT_WHEN_FINISHED * len(rows):
            batch.compact(live)
            rows = [rows[r] for r in live]
        batch.step()
    for i in rows:
        if i is not None and results[i] is None:
            results[i] = Generation(generated[i], hit_max_tokens=True)


def _heads(model: Any, prompts: Sequence[list[int]], segments: Sequence[Any], share_prefix: bool,
           device: torch.device) -> dict[Any, _Head]:
    """Each segment's shared head, its keys/values computed by one forward of the head alone."""
    heads = {}
    for seg in dict.fromkeys(segments):
        members = [p for p, s in zip(prompts, segments) if s == seg]
        shared = common_prefix_length(members) if share_prefix else 0
        if shared < MIN_SHARED_PREFIX:
            heads[seg] = _Head(0, None)
            continue
        kv = KVSlots(num_layers(model), rows=1, capacity=shared, device=device)
        kv.mask[0] = 1
        model(input_ids=torch.tensor([members[0][:shared]], device=device), attention_mask=kv.mask,
              past_key_values=kv.cache(slice(0, 1), 0), use_cache=True, logits_to_keep=1)
        heads[seg] = _Head(shared, kv)
    return heads


def _groups(prompts: Sequence[list[int]], segments: Sequence[Any] | None,
            batch_size: int) -> tuple[list[Any], list[list[int]]]:
    """Rows in batches of up to ``batch_size``, longest first within a segment.

    Whole segments are packed into a batch while they fit; a segment is split only when it
    does not fit into an empty batch. Rows of one task tend to decode for similar lengths
    (a letter, or a chain of thought), so a long-decoding task split across two batches
    would pay its long tail of steps twice, the second time at a small batch.
    """
    segs = list(segments) if segments is not None else [0] * len(prompts)
    if len(segs) != len(prompts):
        raise ValueError(f"{len(segs)} segments for {len(prompts)} prompts")
    groups: list[list[int]] = []
    current: list[int] = []
    for seg in dict.fromkeys(segs):
        rows = sorted((i for i in range(len(prompts)) if segs[i] == seg), key=lambda i: -len(prompts[i]))
        if current and len(current) + len(rows) > batch_size:
            groups.append(current)
            current = []
        while len(rows) > batch_size:
            groups.append(rows[:batch_size])
            rows = rows[batch_size:]
        current.extend(rows)
    if current:
        groups.append(current)
    return segs, groups


def _slot_chunks(group: list[int], prompts: Sequence[list[int]], segs: list[Any], heads: dict[Any, _Head],
                 prefill_tokens: int) -> tuple[list[tuple[_Head, list[list[int]]]], list[int]]:
    """A batch's prefill chunks (one segment's rows each, by length) and the prompt of each batch row."""
    chunks: list[tuple[_Head, list[list[int]]]] = []
    members: list[int] = []
    for seg in dict.fromkeys(segs[i] for i in group):
        head = heads[seg]
        rows = [i for i in group if segs[i] == seg]
        tails = [prompts[i][head.length:] for i in rows]
        for chunk in length_batches([len(t) for t in tails], max_rows=len(rows), token_budget=prefill_tokens,
                                    overhead=PREFILL_OVERHEAD):
            chunks.append((head, [tails[k] for k in chunk]))
            members.extend(rows[k] for k in chunk)
    return chunks, members


def default_prefill_tokens(device: torch.device) -> int:
    return PREFILL_TOKENS if device.type == "cpu" else PREFILL_TOKENS_ACCELERATOR


def _prefilled_batches(
    model: Any, prompts: Sequence[list[int]], *, pad_id: int, batch_size: int, device: torch.device,
    segments: Sequence[Any] | None, share_prefix: bool, prefill_tokens: int | None, slots: bool | None,
    decode_capacity: int = 0, on_forward: Callable[[int], None] | None = None,
) -> Iterator[tuple[list[int], list[int], _SlotBatch | _CacheBatch]]:
    """Each batch of prompts, prefilled: (its prompt indices, the prompt of each batch row, the batch).

    Generation and stability share this: segments' heads fed once, rows grouped by
    ``_groups``, each batch's tails prefilled into KV slots (room for ``decode_capacity``
    more tokens), or, where slots do not apply, into the model's own cache in one pass.
    """
    segs, groups = _groups(prompts, segments, batch_size)
    budget = prefill_tokens or default_prefill_tokens(device)
    kv, heads = None, {}
    if supports_slots(model) if slots is None else slots:
        heads = _heads(model, prompts, segs, share_prefix, device)
        kv = KVSlots(num_layers(model), rows=max(len(g) for g in groups),
                     capacity=max(len(p) for p in prompts) + decode_capacity, device=device)
    for group in groups:
        if kv is not None:
            chunks, members = _slot_chunks(group, prompts, segs, heads, budget)
            yield group, members, _SlotBatch(model, kv, chunks, pad_id=pad_id, device=device, on_forward=on_forward)
        else:
            batch = _CacheBatch(model, [prompts[i] for i in group], pad_id=pad_id, device=device)
            if on_forward is not None:
                on_forward(len(group))
            yield group, list(group), batch


@torch.inference_mode()
def greedy_generate(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    segments: Sequence[Any] | None = None,
    on_batch: Callable[[list[int]], None] | None = None,
    share_prefix: bool = True,
    prefill_tokens: int | None = None,
    slots: bool | None = None,
) -> list[Generation]:
    """Greedy continuations of tokenized prompts, in input order.

    ``segments[i]`` names the set prompt i belongs to (a task: its prompts share a long
    head of template, instruction and preamble, 50-65 % of the tokens on TRACE). Each
    set's head is fed once and its keys/values copied into its rows, so prefill pays only
    for each row's own tail. Rows are decoded in batches of up to ``batch_size``: whole
    sets packed together while they fit, a set's rows longest first (``_groups``), so
    small sets share a batch and the steps of the one that decodes longest are paid once
    for all of them. Each batch is prefilled in chunks of at most ``prefill_tokens``
    padded positions. ``on_batch`` gets the prompt indices of each finished batch.
    ``slots`` picks the preallocated KV layout (default: wherever the model's layers all
    attend fully, ``supports_slots``); without it, a batch is prefilled in one pass into
    the model's own cache, with no head sharing.
    """
    if not prompts:
        return []
    results: list[Generation | None] = [None] * len(prompts)
    stop = torch.tensor(list(stop_ids), device=device)
    for group, members, batch in _prefilled_batches(
            model, prompts, pad_id=pad_id, batch_size=batch_size, device=device, segments=segments,
            share_prefix=share_prefix, prefill_tokens=prefill_tokens, slots=slots, decode_capacity=max_new_tokens):
        _decode(batch, members, max_new_tokens=max_new_tokens, stop=stop, results=results)
        if on_batch is not None:
            on_batch(list(group))
    done = [r for r in results if r is not None]
    assert len(done) == len(prompts), "a prompt was left without a generation"
    return done


@torch.inference_mode()
def last_position_logits(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    segments: Sequence[Any] | None = None,
    share_prefix: bool = True,
    prefill_tokens: int | None = None,
    slots: bool | None = None,
    on_forward: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """The next-token logits after each prompt (its last position only), in input order.

    The same prefill as generation: each segment's head fed once, then every row's tail
    in exactly one forward (``on_forward(rows)`` after each), in chunks by length.
    """
    if not prompts:
        return []
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for _group, members, batch in _prefilled_batches(
            model, prompts, pad_id=pad_id, batch_size=batch_size, device=device, segments=segments,
            share_prefix=share_prefix, prefill_tokens=prefill_tokens, slots=slots, on_forward=on_forward):
        for r, i in enumerate(members):
            out[i] = batch.last_logits[r]
    logits = [x for x in out if x is not None]
    assert len(logits) == len(prompts), "a prompt was left without logits"
    return logits
