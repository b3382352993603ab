"""Batched greedy generation: the same tokens as HF ``generate`` one prompt at a time.

The tiny model's random init with tied embeddings just repeats its last token, which would
make any comparison trivially true; its weights are re-drawn here (std 0.1, an untied
output head) so every prompt gets its own varied continuation.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from slmcl.config.spec import ChatSpec, ModelSpec, TaskSpec
from slmcl.inference.evaluation import evaluate_task
from slmcl.inference.generation import Generation, greedy_generate
from slmcl.models.loading import LoadedModel, load_model
from slmcl.tasks.prompts import PromptRenderer

CPU = torch.device("cpu")
MAX_NEW = 8
LENGTHS = (37, 5, 21, 12, 30, 9)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    lm = load_model(ModelSpec(name=str(tiny_model_dir)), "cpu")
    model = lm.model
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        for name, p in model.named_parameters():
            if p.dim() == 2 and "lm_head" not in name:
                p.normal_(0, 0.1)
    model.eval()
    return lm


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(20, 49152) for _ in range(n)] for n in LENGTHS]


def hf_greedy(lm: LoadedModel, prompt: list[int], max_new: int, stop_ids: list[int]) -> list[int]:
    """HF ``generate``, one unpadded prompt, greedy; returns the new tokens (stop token included)."""
    out = lm.model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new, pad_token_id=lm.pad_token_id, eos_token_id=stop_ids,
    )
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def free_runs(loaded: LoadedModel, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's first MAX_NEW greedy tokens with only the model's own stop tokens."""
    runs = [hf_greedy(loaded, p, MAX_NEW, loaded.stop_token_ids) for p in prompts]
    assert all(len(r) == MAX_NEW for r in runs), "the model should not emit EOS here"
    assert len({tuple(r) for r in runs}) == len(runs), "continuations should differ between prompts"
    return runs


def expected(run: list[int], stop: set[int]) -> Generation:
    for k, tok in enumerate(run):
        if tok in stop:
            return Generation(run[:k], hit_max_tokens=False)
    return Generation(run, hit_max_tokens=True)


class CountingModel:
    """Records the batch size of every forward pass."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config  # what greedy_generate reads to pick its KV layout
        self.sizes: list[int] = []
        self.widths: list[int] = []

    def __call__(self, **kw: Any) -> Any:
        self.sizes.append(int(kw["input_ids"].shape[0]))
        self.widths.append(int(kw["input_ids"].shape[1]))
        return self.model(**kw)


@pytest.mark.parametrize("slots", [True, False], ids=["kv-slots", "model-cache"])
def test_matches_hf_generate_without_stops(loaded: LoadedModel, prompts: list[list[int]],
                                           free_runs: list[list[int]], slots: bool) -> None:
    gens = greedy_generate(loaded.model, prompts, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids,
                           max_new_tokens=MAX_NEW, batch_size=3, device=CPU, slots=slots)
    assert [g.token_ids for g in gens] == free_runs
    assert all(g.hit_max_tokens for g in gens)


@pytest.mark.parametrize("slots", [True, False], ids=["kv-slots", "model-cache"])
def test_matches_hf_generate_with_early_stops_and_prunes_finished_rows(
    loaded: LoadedModel, prompts: list[list[int]], free_runs: list[list[int]], slots: bool
) -> None:
    # Stop tokens taken from the model's own outputs: the 5-token prompt stops at once, the
    # 37-token prompt after 3 tokens (they also stop any other row that emits them).
    stop = set(loaded.stop_token_ids) | {free_runs[1][0], free_runs[0][3]}
    stop_ids = sorted(stop)
    want = [expected(r, stop) for r in free_runs]
    # HF with the same stop tokens agrees with the truncation of its free run.
    for p, w in zip(prompts, want):
        got_hf = hf_greedy(loaded, p, MAX_NEW, stop_ids)
        if w.hit_max_tokens:
            assert got_hf == w.token_ids
        else:
            assert got_hf[:-1] == w.token_ids and got_hf[-1] in stop
    assert want[1] == Generation([], hit_max_tokens=False)
    assert want[0].hit_max_tokens is False and len(want[0].token_ids) == 3
    assert any(w.hit_max_tokens for w in want)

    counting = CountingModel(loaded.model)
    batches: list[list[int]] = []
    gens = greedy_generate(counting, prompts, pad_id=loaded.pad_token_id, stop_ids=stop_ids,
                           max_new_tokens=MAX_NEW, batch_size=3, device=CPU, on_batch=batches.append, slots=slots)
    assert gens == want
    assert [len(b) for b in batches] == [3, 3] and sorted(i for b in batches for i in b) == list(range(6))

    # Forward passes: a prefill of the whole batch, then one decode step per token with only
    # the rows still alive (rows sorted by length, longest first; in batches of 3, one
    # finished row is already a quarter of the batch, so it leaves at once).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    sizes = []
    for start in range(0, len(order), 3):
        rows = order[start:start + 3]
        sizes.append(len(rows))
        for step in range(MAX_NEW - 1):
            alive = sum(1 for i in rows if want[i].hit_max_tokens or len(want[i].token_ids) > step)
            if alive == 0:
                break
            sizes.append(alive)
    assert counting.sizes == sizes
    assert min(counting.sizes) < 3  # the batch did shrink


def test_stop_on_the_last_allowed_token_is_not_hit_max(loaded: LoadedModel, prompts: list[list[int]],
                                                       free_runs: list[list[int]]) -> None:
    run = free_runs[2]
    last = run[MAX_NEW - 1]
    assert last not in run[:-1]
    gens = greedy_generate(loaded.model, [prompts[2]], pad_id=loaded.pad_token_id,
                           stop_ids=[*loaded.stop_token_ids, last], max_new_tokens=MAX_NEW, batch_size=1, device=CPU)
    assert gens == [Generation(run[:-1], hit_max_tokens=False)]


@pytest.mark.parametrize("slots", [True, False], ids=["kv-slots", "model-cache"])
@pytest.mark.parametrize("batch_size", [1, 2, 6])
def test_batch_size_does_not_change_tokens(loaded: LoadedModel, prompts: list[list[int]],
                                           free_runs: list[list[int]], batch_size: int, slots: bool) -> None:
    gens = greedy_generate(loaded.model, prompts, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids,
                           max_new_tokens=MAX_NEW, batch_size=batch_size, device=CPU, slots=slots)
    assert [g.token_ids for g in gens] == free_runs


def test_one_new_token(loaded: LoadedModel, prompts: list[list[int]], free_runs: list[list[int]]) -> None:
    gens = greedy_generate(loaded.model, prompts, pad_id=loaded.pad_token_id, stop_ids=[free_runs[3][0]],
                           max_new_tokens=1, batch_size=4, device=CPU)
    assert gens[3] == Generation([], hit_max_tokens=False)
    for i, g in enumerate(gens):
        if i != 3 and free_runs[i][0] != free_runs[3][0]:
            assert g == Generation(free_runs[i][:1], hit_max_tokens=True)


def test_evaluate_task_reports_predictions(loaded: LoadedModel) -> None:
    from slmcl.tasks.data import Example

    renderer = PromptRenderer(loaded.tokenizer, ChatSpec())
    task = TaskSpec(name="mc", kind="multiple_choice", instruction="Pick.", train_file="a", test_file="b")
    rows = [Example(i, f"Question {i}? A. yes B. no", "A") for i in range(3)]
    progress: list[tuple[int, int]] = []
    ev = evaluate_task(loaded.model, loaded, renderer, task, rows, max_new_tokens=4, batch_size=2,
                       on_progress=lambda d, n: progress.append((d, n)))
    assert ev.total == 3 and [p.index for p in ev.predictions] == [0, 1, 2]
    assert progress == [(0, 3), (2, 3), (3, 3)]
    assert all(p.gold_normalized == "A" for p in ev.predictions)
    assert ev.correct == sum(p.correct for p in ev.predictions)
    assert ev.new_tokens == sum(p.new_tokens for p in ev.predictions) <= 12


def test_shared_prefix_is_computed_once_and_changes_no_token(loaded: LoadedModel) -> None:
    """Prompts with a common head (as every task's are): one prefix pass, then only the tails."""
    rng = random.Random(1)
    head = [rng.randrange(20, 49152) for _ in range(24)]
    tails = [[rng.randrange(20, 49152) for _ in range(n)] for n in (3, 11, 7, 1, 15)]
    prompts = [head + t for t in tails]
    want = [hf_greedy(loaded, p, MAX_NEW, loaded.stop_token_ids) for p in prompts]
    counting = CountingModel(loaded.model)
    got = greedy_generate(counting, prompts, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids,
                          max_new_tokens=MAX_NEW, batch_size=2, device=CPU)
    assert [g.token_ids for g in got] == [w[:MAX_NEW] for w in want]
    # one prefix forward of batch 1, then 3 batches (2, 2, 1) of prefill + decode
    assert counting.sizes[0] == 1 and counting.sizes.count(1) >= 1
    prefill_widths = counting.widths[1:]
    assert max(prefill_widths) <= 15, "prefill re-fed the shared head"
    plain = greedy_generate(loaded.model, prompts, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids,
                            max_new_tokens=MAX_NEW, batch_size=2, device=CPU, share_prefix=False)
    assert [g.token_ids for g in plain] == [g.token_ids for g in got]


@pytest.mark.parametrize("share_prefix", [False, True])
def test_chunked_prefill_into_one_decode_batch_changes_no_token(loaded: LoadedModel, share_prefix: bool) -> None:
    """A small prefill budget splits one decode batch into chunks of different widths; each
    chunk writes into its rows of the batch's KV slots (narrow chunks left-padded after the
    shared head), and the batch decodes together."""
    rng = random.Random(2)
    head = [rng.randrange(20, 49152) for _ in range(20)]
    tails = [[rng.randrange(20, 49152) for _ in range(n)] for n in (3, 19, 7, 1, 15, 11)]
    prompts = [head + t for t in tails]
    want = [hf_greedy(loaded, p, MAX_NEW, loaded.stop_token_ids)[:MAX_NEW] for p in prompts]
    counting = CountingModel(loaded.model)
    got = greedy_generate(counting, prompts, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids,
                          max_new_tokens=MAX_NEW, batch_size=6, device=CPU, share_prefix=share_prefix,
                          prefill_tokens=40)
    assert [g.token_ids for g in got] == want
    widths = counting.widths[1:] if share_prefix else counting.widths
    prefills = [w for w in widths if w > 1]
    assert len(prefills) >= 3, f"expected several prefill chunks, got widths {widths}"
    decode_sizes = [s for s, w in zip(counting.sizes, counting.widths) if w == 1]
    assert decode_sizes[0] == 6, "the chunks should decode as one batch"


def test_finished_rows_leave_the_batch_in_bulk(loaded: LoadedModel) -> None:
    """In a batch of 8, rows finished one at a time stay (outputs ignored) until a quarter of
    the batch has finished, then leave together; no token changes."""
    rng = random.Random(3)
    prompts = [[rng.randrange(20, 49152) for _ in range(10 + k)] for k in range(8)]
    free = [hf_greedy(loaded, p, MAX_NEW, loaded.stop_token_ids) for p in prompts]
    stop = {free[7][0], free[6][2]}  # the longest prompt stops at once, the next one after 2 tokens
    stop_ids = sorted(set(loaded.stop_token_ids) | stop)
    want = [expected(r, set(stop_ids)) for r in free]
    counting = CountingModel(loaded.model)
    got = greedy_generate(counting, prompts, pad_id=loaded.pad_token_id, stop_ids=stop_ids,
                          max_new_tokens=MAX_NEW, batch_size=8, device=CPU)
    assert got == want
    finished_by = [sum(1 for w in want if not w.hit_max_tokens and len(w.token_ids) <= k) for k in range(MAX_NEW)]
    assert finished_by[0] == 1 and finished_by[2] >= 2, finished_by
    decode_sizes = [n for n, w in zip(counting.sizes, counting.widths) if w == 1]
    assert decode_sizes[0] == 8, "a single finished row (1/8) stays in the batch"
    assert min(decode_sizes) == 8 - finished_by[2] < 8, "once 2/8 finished, they leave together"


def test_segments_with_their_own_heads_share_one_decode_batch(loaded: LoadedModel) -> None:
    """Two tasks' prompts (different heads, as two tasks' instructions differ) in one call: each
    head is fed once, the rows of both decode as one batch, and no token changes."""
    rng = random.Random(4)
    heads = [[rng.randrange(20, 49152) for _ in range(n)] for n in (18, 30)]
    tails = [[rng.randrange(20, 49152) for _ in range(n)] for n in (4, 9, 2, 13, 6)]
    prompts = [heads[0] + tails[0], heads[1] + tails[1], heads[0] + tails[2], heads[1] + tails[3],
               heads[1] + tails[4]]
    segments = [0, 1, 0, 1, 1]
    want = [hf_greedy(loaded, p, MAX_NEW, loaded.stop_token_ids)[:MAX_NEW] for p in prompts]
    counting = CountingModel(loaded.model)
    got = greedy_generate(counting, prompts, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids,
                          max_new_tokens=MAX_NEW, batch_size=8, device=CPU, segments=segments)
    assert [g.token_ids for g in got] == want
    # one forward per head (its shared length: the head minus nothing, as tails differ at once)
    assert counting.sizes[:2] == [1, 1] and sorted(counting.widths[:2]) == [18, 30]
    prefill_widths = [w for w in counting.widths[2:] if w > 1]
    assert max(prefill_widths) <= 13, "a prefill re-fed a head"
    decode_sizes = [n for n, w in zip(counting.sizes[2:], counting.widths[2:]) if w == 1]
    assert decode_sizes[0] == 5, "both segments' rows decode in one batch"


def test_segment_order_keeps_a_sets_rows_together(loaded: LoadedModel) -> None:
    """With more rows than a batch, batches are cut from each set's rows in turn (longest first)."""
    rng = random.Random(5)
    prompts = [[rng.randrange(20, 49152) for _ in range(5 + k)] for k in range(6)]
    segments = [1, 0, 1, 0, 1, 0]
    batches: list[list[int]] = []
    greedy_generate(loaded.model, prompts, pad_id=loaded.pad_token_id, stop_ids=loaded.stop_token_ids,
                    max_new_tokens=2, batch_size=3, device=CPU, segments=segments, on_batch=batches.append)
    assert batches == [[4, 2, 0], [5, 3, 1]]
