"""Task accuracy of a checkpoint: batched greedy generation, then exact match after normalization.

Generation dominates the protocol's cost, so the loop is our own rather than
``generate``: prompts are sorted by length (little padding), batches are large, and a
row that has emitted a stop token (EOS or the template's end-of-turn) leaves the batch
at once, its KV-cache rows dropped, so a multiple-choice row costs ~2 decode steps even
when a math row beside it runs to the token limit. Decoding is greedy, left-padded, with
explicit position ids, so a batched row gives the same tokens as the row alone.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from slmcl.answers import is_correct
from slmcl.data import Example
from slmcl.modeling import LoadedModel
from slmcl.prompts import PromptRenderer
from slmcl.spec import TaskSpec


@dataclass(frozen=True)
class Prediction:
    index: int
    prompt: str
    gold: str
    gold_normalized: str
    prediction: str
    raw_output: str
    hit_max_tokens: bool
    correct: bool
    new_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskEvaluation:
    task: str
    correct: int
    total: int
    predictions: list[Prediction]
    seconds: float
    new_tokens: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # without the stop token
    hit_max_tokens: bool


MIN_SHARED_PREFIX = 16  # below this, a separate prefix pass costs more than it saves


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
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool = True,
) -> list[Generation]:
    """Greedy continuations of tokenized prompts, in input order.

    The prompts of one task share a long head (template, instruction, the task's preamble:
    50-65 % of the tokens on TRACE). Its KV cache is computed once and repeated for every
    batch, so prefill only pays for each row's own tail.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[Generation | None] = [None] * len(prompts)
    stop = torch.tensor(list(stop_ids), device=device)
    shared = common_prefix_length(prompts) if share_prefix else 0
    prefix_cache = None
    if shared >= MIN_SHARED_PREFIX:
        head = torch.tensor([prompts[0][:shared]], device=device)
        prefix_cache = model(input_ids=head, use_cache=True).past_key_values
    else:
        shared = 0
    for start in range(0, len(order), batch_size):
        batch_idx = order[start: start + batch_size]
        tails = [prompts[i][shared:] for i in batch_idx]
        width = max(len(t) for t in tails)
        ids = torch.full((len(batch_idx), width), pad_id, dtype=torch.long)
        tail_mask = torch.zeros((len(batch_idx), width), dtype=torch.long)
        for r, t in enumerate(tails):
            ids[r, width - len(t):] = torch.tensor(t)
            tail_mask[r, width - len(t):] = 1
        ids, tail_mask = ids.to(device), tail_mask.to(device)
        positions = shared + (tail_mask.cumsum(-1) - 1).clamp(min=0)
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch_idx))
            mask = torch.cat([tail_mask.new_ones((len(batch_idx), shared)), tail_mask], dim=1)
        else:
            cache, mask = None, tail_mask
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        next_tok = out.logits[:, -1, :].argmax(-1)
        last_pos = positions[:, -1]
        alive = list(range(len(batch_idx)))  # rows of the current tensors -> rows of batch_idx
        generated: list[list[int]] = [[] for _ in batch_idx]
        for step in range(max_new_tokens):
            finished = torch.isin(next_tok, stop)
            for r, tok, fin in zip(alive, next_tok.tolist(), finished.tolist()):
                if fin:
                    results[batch_idx[r]] = Generation(generated[r], hit_max_tokens=False)
                else:
                    generated[r].append(tok)
            if step == max_new_tokens - 1:
                break
            keep = (~finished).nonzero().flatten()
            if keep.numel() == 0:
                break
            if keep.numel() < len(alive):  # finished rows stop costing work
                cache.batch_select_indices(keep)
                mask, next_tok, last_pos = mask[keep], next_tok[keep], last_pos[keep]
                alive = [alive[k] for k in keep.tolist()]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            last_pos = last_pos + 1
            out = model(
                input_ids=next_tok[:, None],
                attention_mask=mask,
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            next_tok = out.logits[:, -1, :].argmax(-1)
        for r in alive:
            if results[batch_idx[r]] is None:
                results[batch_idx[r]] = Generation(generated[r], hit_max_tokens=True)
        if on_batch is not None:
            on_batch(len(batch_idx))
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def render_prompt_ids(loaded: LoadedModel, renderer: PromptRenderer, task: TaskSpec, examples: Sequence[Example]) -> list[list[int]]:
    return [
        loaded.tokenizer(renderer.prompt_text(task.instruction, ex.prompt), add_special_tokens=False).input_ids
        for ex in examples
    ]


def evaluate_task(
    model: Any,
    loaded: LoadedModel,
    renderer: PromptRenderer,
    task: TaskSpec,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> TaskEvaluation:
    """Accuracy and per-example predictions of ``model`` (base or adapted) on one task's test rows."""
    t0 = time.perf_counter()
    prompt_ids = render_prompt_ids(loaded, renderer, task, examples)
    done = 0

    def progressed(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, len(examples))

    gens = greedy_generate(
        model, prompt_ids, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids,
        max_new_tokens=max_new_tokens, batch_size=batch_size, device=loaded.device, on_batch=progressed,
    )
    preds: list[Prediction] = []
    for ex, gen in zip(examples, gens):
        raw = loaded.tokenizer.decode(gen.token_ids, skip_special_tokens=False)
        pred, gold, ok = is_correct(raw, ex.answer, task.kind, extra_markers=loaded.special_tokens)
        preds.append(Prediction(ex.index, ex.prompt, ex.answer, gold, pred, raw, gen.hit_max_tokens, ok, len(gen.token_ids)))
    return TaskEvaluation(
        task=task.name,
        correct=sum(p.correct for p in preds),
        total=len(preds),
        predictions=preds,
        seconds=time.perf_counter() - t0,
        new_tokens=sum(p.new_tokens for p in preds),
    )
