"""``make bench``: slmcl's paths against the naive baseline, same process, same model, same data.

    python -m bench.run_bench [--device cpu|cuda] [--reps 3] [--quick]
                              [--model PATH|embedded | --model-shape llama-3.2-1b|smollm2-135m]
                              [--rows train,eval,stability,run] [--out bench/results]

Every row is timed as ``--reps`` interleaved repetitions (naive, ours, naive, ours, ...)
after one untimed warm-up of each path; the table holds the medians. ``ratio`` is how many
times better ours is: naive/ours for times and counts, ours/naive for rates (examples/s,
tokens/s, roofline fractions), so > 1 always means ours wins.

Rows (sizes are recorded in the JSON):

* ``eval_*``: one checkpoint evaluated on the test rows of all three tasks;
* ``stability_*``: the stability pass of one adapted checkpoint (ours reuses the cached
  base distributions; their one-off cost is its own row);
* ``train_*``: one training stage from a fresh adapter;
* ``train_<strategy>``: stage 2 of O-LoRA, OSF, ProCL and replay beside ``lora``'s (bench/strategy_bench.py);
* ``run_*``: a whole run, base + one stage per task, end to end (ours: ``ExperimentRunner``
  with a fresh output folder and no cached base results, i.e. a single run on its own).

More rows (service mode, scaling) plug in through ``PHASES`` / ``register_phase`` below.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import naive
from slmcl.config.spec import EMBEDDED_MODEL, ExperimentSpec, ModelSpec, spec_from_dict
from slmcl.models import loading as modeling
from slmcl.models.engine import Engine, stage_seed
from slmcl.models.runtime import keep_freed_memory
from slmcl.protocol.embedded import ExperimentRunner
from slmcl.tasks.data import load_examples

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "trace" / "llm-cl-500"
TASKS = ["fomc", "scienceqa", "numgluecm"]
SEED = 33

# Random-weight models with real shapes (no weights are downloadable on the GPU hosts). Both use
# the SmolLM2 tokenizer, so Llama-3.2-1B's vocabulary is 49152 here instead of 128256: its
# embedding/LM head is 2.5x smaller than the real model's (a deviation recorded in the JSON).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                         max_position_embeddings=131072, rms_norm_eps=1e-5),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
}

# Datasheet peaks for the GPU rows (performance.md §2.1): dense bf16 FLOP/s and HBM bytes/s.
GPU_PEAKS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.0e12),
]


@dataclass(frozen=True)
class Sizes:
    eval_rows: int  # test rows per task, eval row
    eval_tokens: int  # max_new_tokens, eval row
    train_rows: int  # training examples, train row (one stage on fomc)
    ref_rows: int  # reference rows, stability row
    run_eval_rows: int  # the whole-run row uses smaller subsets
    run_eval_tokens: int
    run_train_rows: int
    run_ref_rows: int


SIZES = {
    # CPU: the largest subsets that keep `make bench` within 15 minutes on 2 cores (the naive
    # path takes ~3/4 of it). Small subsets understate our gains: the study's test sets have
    # 81-100 rows per task and 256 new tokens, where batching and early exit pay more.
    "cpu": Sizes(eval_rows=12, eval_tokens=48, train_rows=16, ref_rows=16,
                 run_eval_rows=8, run_eval_tokens=16, run_train_rows=4, run_ref_rows=4),
    # GPU: sized so one model's benchmark fits a 10-minute device call (random weights decode to the cap).
    "cuda": Sizes(eval_rows=32, eval_tokens=64, train_rows=128, ref_rows=48,
                  run_eval_rows=8, run_eval_tokens=32, run_train_rows=64, run_ref_rows=48),
    "quick": Sizes(eval_rows=2, eval_tokens=8, train_rows=4, ref_rows=4,
                   run_eval_rows=1, run_eval_tokens=4, run_train_rows=2, run_ref_rows=2),
}


@dataclass
class Row:
    name: str
    unit: str
    naive: float | None
    ours: float | None
    better: str = "lower"  # "lower" or "higher"
    note: str = ""
    naive_samples: list[float] = field(default_factory=list)
    ours_samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.naive is None or self.ours is None:
            return None
        num, den = (self.naive, self.ours) if self.better == "lower" else (self.ours, self.naive)
        if den == 0:
            return math.inf if num > 0 else None
        return num / den

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "naive": self.naive, "ours": self.ours, "ratio": self.ratio,
                "better": self.better, "note": self.note,
                "naive_samples": self.naive_samples, "ours_samples": self.ours_samples}


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class Bench:
    """What every phase needs: the resident engine, settings, a log, and where rows go."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.device = torch.device(args.device)
        self.sizes = SIZES["quick"] if args.quick else SIZES[self.device.type]
        overrides = {k: getattr(args, k) for k in Sizes.__dataclass_fields__ if getattr(args, k, None) is not None}
        self.sizes = dataclasses.replace(self.sizes, **overrides)
        self.data_dir = Path(args.data_dir or os.environ.get("SLMCL_DATA_DIR") or DEFAULT_DATA)
        self.rows: list[Row] = []
        self.checks: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="slmcl-bench-"))
        self.checkpoint: dict[str, torch.Tensor] | None = None  # the adapter evaluated by eval/stability
        self.checkpoint_source = ""
        self.loaded = self._load_model()
        self.spec = self.make_spec()
        self.engine = Engine(self.spec, loaded=self.loaded)
        self.n_params = sum(p.numel() for n, p in self.engine.model.named_parameters() if "lora_" not in n)

    # -- set-up -----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t_start:7.1f}s] {msg}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _load_model(self) -> modeling.LoadedModel:
        args = self.args
        t0 = time.perf_counter()
        if args.model_shape:
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            modeling.quiet_transformers()
            tok = AutoTokenizer.from_pretrained(args.tokenizer or modeling.embedded_model_dir())
            tok.padding_side = "left"
            cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                              **MODEL_SHAPES[args.model_shape])
            torch.manual_seed(0)
            with torch.device(self.device):
                model = LlamaForCausalLM(cfg)  # float32; bf16 on CUDA (Module.bfloat16: transformers' .to is untyped)
                if self.device.type == "cuda":
                    model = model.bfloat16()
            model.generation_config.eos_token_id = tok.eos_token_id
            self.model_name = f"random-{args.model_shape}"
            loaded = modeling.prepare_loaded(model, tok, self.device, name=self.model_name)
        else:
            name = EMBEDDED_MODEL if args.model in (None, "", "embedded") else args.model
            self.model_name = name
            loaded = modeling.load_model(ModelSpec(name=name), args.device)
        self.log(f"model {self.model_name} loaded on {self.device} ({loaded.dtype}) in {time.perf_counter() - t0:.1f}s")
        return loaded

    def make_spec(self, *, eval_rows: int | None = None, eval_tokens: int | None = None,
                  train_rows: int | None = None, ref_rows: int | None = None,
                  output_dir: str | None = None) -> ExperimentSpec:
        s = self.sizes
        raw: dict[str, Any] = {
            "name": "bench",
            "model": {"name": self.model_name if not self.args.model_shape else "embedded"},
            "data_dir": str(self.data_dir),
            "tasks": list(TASKS),
            "orders": [list(TASKS)],
            "seeds": [SEED],
            "training": {"max_examples": train_rows or s.train_rows},
            "evaluation": {"max_examples": eval_rows or s.eval_rows, "max_new_tokens": eval_tokens or s.eval_tokens},
            "reference": {"max_examples": ref_rows or s.ref_rows},
            "device": self.device.type,
            "output_dir": output_dir or str(self.tmp / "unused"),
        }
        if self.args.eval_batch:
            raw["evaluation"]["batch_size"] = self.args.eval_batch
        if self.args.ref_batch:
            raw["reference"]["batch_size"] = self.args.ref_batch
        if self.args.tokens_per_forward:
            raw["training"]["tokens_per_forward"] = self.args.tokens_per_forward
        spec = spec_from_dict(raw)
        if self.args.model_shape:  # same resident key as the engine's: the loaded model is passed in
            spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, name=self.model_name))
        return spec

    def use(self, spec: ExperimentSpec) -> None:
        self.engine.use_spec(spec)

    # -- adapter states ---------------------------------------------------------------------
    def fresh_adapter(self) -> None:
        self.engine.reset_adapter(SEED)

    def load_checkpoint(self) -> None:
        """The adapted checkpoint evaluated by the eval and stability rows."""
        from peft import set_peft_model_state_dict

        if self.checkpoint is None:
            # No train row ran: a deterministic stand-in with non-zero LoRA B matrices.
            self.fresh_adapter()
            g = torch.Generator().manual_seed(SEED)
            with torch.no_grad():
                for n, p in self.engine.model.named_parameters():
                    if "lora_B" in n:
                        p.copy_((torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype))
            self.checkpoint = modeling.adapter_state(self.engine.model)
            self.checkpoint_source = "fresh LoRA with lora_B ~ N(0, 1e-3) (no train row ran)"
        set_peft_model_state_dict(self.engine.model, self.checkpoint)

    # -- timing -------------------------------------------------------------------------------
    def interleaved(self, label: str, naive_fn: Callable[[], dict[str, Any]], ours_fn: Callable[[], dict[str, Any]],
                    *, warmup: tuple[Callable[[], Any], Callable[[], Any]] | None = None,
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Warm-up (untimed), then ``reps`` x (naive, ours). Each fn returns metrics incl. ``seconds``."""
        if warmup is not None:
            t0 = time.perf_counter()
            warmup[0]()
            warmup[1]()
            self.sync()
            self.log(f"{label}: warm-up done in {time.perf_counter() - t0:.1f}s")
        naive_res: list[dict[str, Any]] = []
        ours_res: list[dict[str, Any]] = []
        for r in range(self.args.reps):
            for who, fn, sink in (("naive", naive_fn, naive_res), ("ours", ours_fn, ours_res)):
                self.sync()
                res = fn()
                self.sync()
                sink.append(res)
                self.log(f"{label}: rep {r + 1}/{self.args.reps} {who:5s} {res['seconds']:.2f}s")
        return naive_res, ours_res

    def add(self, name: str, unit: str, naive_vals: list[float] | None, ours_vals: list[float] | None,
            better: str = "lower", note: str = "") -> Row:
        nv = [float(x) for x in naive_vals] if naive_vals else []
        ov = [float(x) for x in ours_vals] if ours_vals else []
        row = Row(name, unit, median(nv), median(ov), better, note, nv, ov)
        self.rows.append(row)
        return row

    def gpu_peaks(self) -> tuple[float, float] | None:
        if self.device.type != "cuda":
            return None
        if self.args.peak_tflops and self.args.peak_bw:
            return self.args.peak_tflops * 1e12, self.args.peak_bw * 1e9
        name = torch.cuda.get_device_name(self.device)
        for key, flops, bw in GPU_PEAKS:
            if key.lower() in name.lower() and ("PCIe" not in key or "pcie" in name.lower()):
                return flops, bw
        return None


# ---------------------------------------------------------------------------------------
# Phases. Each appends rows to ``b.rows``; the driver runs them in PHASES order.


def phase_train(b: Bench) -> None:
    spec = b.make_spec()
    b.use(spec)
    task = spec.task("fomc")
    rows = load_examples(task.train_file, limit=spec.training.max_examples)
    step = 1

    def naive_fn(examples: list[Any] | None = None) -> dict[str, Any]:
        b.fresh_adapter()
        s = stage_seed(SEED, step)
        torch.manual_seed(s)
        t0 = time.perf_counter()
        ex = examples if examples is not None else load_examples(task.train_file, limit=spec.training.max_examples)
        r = naive.naive_train_stage(b.engine.model, b.loaded, b.engine.renderer, task, ex, spec.training,
                                    generator=torch.Generator().manual_seed(s))
        b.sync()
        dt = time.perf_counter() - t0
        return {"seconds": dt, "tokens": r.tokens, "padded_fraction": r.padded_fraction, "losses": r.step_losses}

    def ours_fn() -> dict[str, Any]:
        b.fresh_adapter()
        t0 = time.perf_counter()
        r = b.engine.train(run_id="bench", seed=SEED, stage=step, task=task, previous_tasks=[])
        b.sync()
        dt = time.perf_counter() - t0
        return {"seconds": dt, "tokens": r.tokens, "padded_fraction": r.padded_fraction,
                "losses": [s.loss for s in r.steps]}

    def warm_naive() -> None:
        naive_fn(rows[:2])

    def warm_ours() -> None:
        b.use(b.make_spec(train_rows=2))
        ours_fn()
        b.use(spec)

    n, o = b.interleaved("train", naive_fn, ours_fn, warmup=(warm_naive, warm_ours))
    b.add("train_seconds", "s/stage", [x["seconds"] for x in n], [x["seconds"] for x in o], "lower",
          f"one stage, {len(rows)} fomc examples, batch 2 x accum 8, from a fresh adapter")
    b.add("train_tokens_per_s", "tokens/s", [x["tokens"] / x["seconds"] for x in n],
          [x["tokens"] / x["seconds"] for x in o], "higher", "real (non-pad) tokens")
    b.add("train_padded_fraction", "fraction", [x["padded_fraction"] for x in n],
          [x["padded_fraction"] for x in o], "lower", "pad tokens / tokens processed")
    peaks = b.gpu_peaks()
    if peaks:
        flops = peaks[0]
        b.add("train_mfu", "fraction of peak", [4 * b.n_params * x["tokens"] / x["seconds"] / flops for x in n],
              [4 * b.n_params * x["tokens"] / x["seconds"] / flops for x in o], "higher",
              f"4N FLOPs x real tokens / s / {flops / 1e12:.0f} TFLOP/s")
    nl, ol = n[0]["losses"], o[0]["losses"]
    rel = max((abs(a - c) / max(abs(a), 1e-12) for a, c in zip(nl, ol)), default=0.0)
    b.checks["train_loss_max_rel_diff"] = rel
    b.checks["train_loss_note"] = "LoRA dropout 0.05 here, so not bitwise comparable; the parity test uses 0"
    b.details["train"] = {"naive_losses": nl, "ours_losses": ol, "tokens": o[0]["tokens"]}
    # The adapter the eval and stability rows evaluate: this stage's result (ours, last rep).
    b.checkpoint = modeling.adapter_state(b.engine.model)
    b.checkpoint_source = f"adapter after the train row's stage ({len(rows)} fomc examples, ours, last rep)"


def _eval_all(b: Bench, spec: ExperimentSpec, who: str) -> dict[str, Any]:
    """Evaluate the loaded checkpoint on every task; returns timing, token counts, predictions."""
    b.load_checkpoint()
    t0 = time.perf_counter()
    preds: dict[str, list[str]] = {}
    correct: dict[str, int] = {}
    tokens = rows = slots = 0
    if who == "naive":
        evals = []
        for task in spec.tasks:
            examples = load_examples(task.test_file, limit=spec.evaluation.max_examples)
            res = naive.naive_evaluate_task(b.engine.model, b.loaded, b.engine.renderer, task, examples,
                                            max_new_tokens=spec.evaluation.max_new_tokens)
            evals.append(res.evaluation)
            slots += res.decode_slots
    else:
        evals = b.engine.evaluate_all(spec.tasks)  # what a run does: all tasks in one generation pass
    for ev in evals:
        preds[ev.task] = [p.prediction for p in ev.predictions]
        correct[ev.task] = ev.correct
        tokens += ev.new_tokens
        rows += ev.total
    b.sync()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": tokens, "rows": rows, "preds": preds, "correct": correct, "slots": slots}


def _roofline_tokens_per_s(b: Bench, batch: int, mean_ctx: float) -> float | None:
    """performance.md §2.2: tokens/s <= b / max((W + b L k_kv) / BW, b 2N / F)."""
    peaks = b.gpu_peaks()
    if not peaks:
        return None
    flops, bw = peaks
    cfg = b.loaded.model.config
    elt = torch.finfo(b.loaded.dtype).bits // 8
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k_kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elt
    w = b.n_params * elt
    t_step = max((w + batch * mean_ctx * k_kv) / bw, batch * 2 * b.n_params / flops)
    return batch / t_step


def phase_eval(b: Bench) -> None:
    spec = b.make_spec()
    b.use(spec)
    warm = b.make_spec(eval_rows=2, eval_tokens=4)

    def warm_ours() -> None:
        b.use(warm)
        _eval_all(b, warm, "ours")
        b.use(spec)

    n, o = b.interleaved(
        "eval", lambda: _eval_all(b, spec, "naive"), lambda: _eval_all(b, spec, "ours"),
        warmup=(lambda: _eval_all(b, warm, "naive"), warm_ours))
    rows = o[0]["rows"]
    b.add("eval_seconds", "s/checkpoint", [x["seconds"] for x in n], [x["seconds"] for x in o], "lower",
          f"{rows} test rows ({spec.evaluation.max_examples}/task x 3), max_new_tokens "
          f"{spec.evaluation.max_new_tokens}; naive batch 4 per task, ours all tasks in one pass, batch "
          f"{spec.evaluation.batch_size}")
    b.add("eval_examples_per_s", "examples/s", [x["rows"] / x["seconds"] for x in n],
          [x["rows"] / x["seconds"] for x in o], "higher")
    b.add("eval_decode_tokens_per_s", "tokens/s", [x["tokens"] / x["seconds"] for x in n],
          [x["tokens"] / x["seconds"] for x in o], "higher", "generated tokens up to the stop token")
    # Roofline fraction (GPU): at the batch each path actually decodes with.
    if b.gpu_peaks():
        tok = b.loaded.tokenizer
        lens = []
        for task in spec.tasks:
            for ex in load_examples(task.test_file, limit=spec.evaluation.max_examples):
                lens.append(len(tok(b.engine.renderer.prompt_text(task.instruction, ex.prompt),
                                    add_special_tokens=False).input_ids))
        mean_new = o[0]["tokens"] / max(1, rows)
        ctx = sum(lens) / len(lens) + mean_new / 2
        per_task = spec.evaluation.max_examples or rows
        rn = _roofline_tokens_per_s(b, min(naive.NAIVE_EVAL_BATCH, per_task), ctx)
        ro = _roofline_tokens_per_s(b, min(spec.evaluation.batch_size, rows), ctx)  # ours batches across tasks
        if rn and ro:
            b.add("eval_roofline_fraction", "fraction", [x["tokens"] / x["seconds"] / rn for x in n],
                  [x["tokens"] / x["seconds"] / ro for x in o], "higher",
                  "decode tokens/s over the §2.2 roofline at the batch each path uses")
    agree = total = 0
    acc_diff = 0
    for t in o[0]["preds"]:
        agree += sum(a == c for a, c in zip(n[0]["preds"][t], o[0]["preds"][t]))
        total += len(o[0]["preds"][t])
        acc_diff = max(acc_diff, abs(n[0]["correct"][t] - o[0]["correct"][t]))
    b.checks["eval_answer_agreement"] = agree / total if total else None
    b.checks["eval_max_correct_diff_per_task"] = acc_diff
    b.details["eval"] = {"rows": rows, "generated_tokens_ours": o[0]["tokens"],
                         "generated_tokens_naive": n[0]["tokens"],
                         "naive_decode_slots": n[0]["slots"], "correct_ours": o[0]["correct"],
                         "correct_naive": n[0]["correct"], "checkpoint": b.checkpoint_source}


def phase_stability(b: Bench) -> None:
    spec = b.make_spec()
    b.use(spec)
    eng = b.engine
    ref_rows = load_examples(spec.reference.file, limit=spec.reference.max_examples)
    instructions = eng.instructions()

    def naive_fn() -> dict[str, Any]:
        b.load_checkpoint()
        t0 = time.perf_counter()
        r = naive.naive_stability(eng.model, b.loaded, eng.renderer, ref_rows, instructions, adapted=True,
                                  max_length=spec.training.max_length)
        b.sync()
        return {"seconds": time.perf_counter() - t0, "fwd": r.forward_rows / len(ref_rows), "values": r.values}

    def ours_fn() -> dict[str, Any]:
        b.load_checkpoint()
        eng.base_logprobs()  # cached: computed in the warm-up, once per (model, reference, rendering)
        before = eng.forward_passes
        t0 = time.perf_counter()
        s = eng.stability()
        b.sync()
        return {"seconds": time.perf_counter() - t0, "fwd": (eng.forward_passes - before) / len(ref_rows),
                "values": s.values}

    def p0_fn() -> float:
        eng._base_logp = None  # noqa: SLF001 - the benchmark times the one-off computation on purpose
        t0 = time.perf_counter()
        eng.base_logprobs()
        b.sync()
        return time.perf_counter() - t0

    def warm_naive() -> None:
        naive.naive_stability(eng.model, b.loaded, eng.renderer, ref_rows[:4], instructions, adapted=True)

    p0 = [p0_fn()]  # the first computation of p_0 doubles as our warm-up
    n, o = b.interleaved("stability", naive_fn, ours_fn, warmup=(warm_naive, lambda: None))
    p0 = [p0_fn() for _ in range(b.args.reps)]
    b.log(f"stability: base p0 (once per model+reference) {statistics.median(p0):.2f}s")
    b.add("stability_seconds", "s/checkpoint", [x["seconds"] for x in n], [x["seconds"] for x in o], "lower",
          f"{len(ref_rows)} reference rows; naive batch 4 + adapter-disabled 2nd pass, ours batch "
          f"{spec.reference.batch_size}, task heads fed once, cached p0")
    heads = len({r.task_name for r in ref_rows})
    b.add("stability_forwards_per_row", "forwards/row", [x["fwd"] for x in n], [x["fwd"] for x in o], "lower",
          f"forward passes per reference row per checkpoint (counted); ours also feeds each task's shared "
          f"head once ({heads} one-row passes of the head alone)")
    b.add("stability_base_p0_seconds", "s once", None, p0, "lower",
          "ours only: base distributions, once per (model, reference, rendering); naive redoes them every checkpoint")
    keys = [k for k in n[0]["values"] if k in o[0]["values"]]
    b.checks["stability_max_abs_diff"] = max(abs(n[0]["values"][k] - o[0]["values"][k]) for k in keys)
    b.checks["stability_compared_keys"] = keys
    b.details["stability"] = {"naive": n[0]["values"], "ours": {k: o[0]["values"][k] for k in keys}}


def phase_run(b: Bench) -> None:
    """A whole run, base + 3 stages, end to end, as ``slmcl run`` does it for one order and seed.

    Ours is a first run: a fresh output folder and nothing cached (the base is evaluated and
    p_0 computed inside the timed run). Later runs of an experiment would also skip those,
    as the naive path never does, so this row understates what a study gains.
    """
    s = b.sizes
    order = list(TASKS)
    counter = {"i": 0}

    def run_spec(**small: int) -> ExperimentSpec:
        counter["i"] += 1
        sizes = dict(eval_rows=s.run_eval_rows, eval_tokens=s.run_eval_tokens, train_rows=s.run_train_rows,
                     ref_rows=s.run_ref_rows)
        sizes.update(small)
        return b.make_spec(**sizes, output_dir=str(b.tmp / f"run-{counter['i']}"))

    def naive_fn() -> dict[str, Any]:
        spec = run_spec()
        b.use(spec)
        t0 = time.perf_counter()
        res = naive.naive_run(b.engine.model, b.loaded, b.engine.renderer, spec, order, SEED, spec.output_dir,
                              stage_seed=stage_seed, reference_generation=b.args.naive_reference_generation)
        b.sync()
        dt = time.perf_counter() - t0
        shutil.rmtree(spec.output_dir, ignore_errors=True)
        return {"seconds": dt, "matrix": res["matrix"], "timings": res["timings"]}

    def ours_fn(spec: ExperimentSpec | None = None) -> dict[str, Any]:
        spec = spec or run_spec()
        b.use(spec)
        b.engine._reference = None  # noqa: SLF001 - a first run: no resident base results either
        b.engine._base_logp = None  # noqa: SLF001
        phases: dict[str, float] = {}

        def progress(ev: Any) -> None:
            if ev.kind == "base_eval" and ev.task == ev.data["evaluated_with"][-1]:
                phases["base_eval"] = phases.get("base_eval", 0.0) + ev.data["seconds"]
            elif ev.kind == "stage_done":
                phases["train"] = phases.get("train", 0.0) + ev.data["train_seconds"]
                phases["stages"] = phases.get("stages", 0.0) + ev.data["seconds"]

        t0 = time.perf_counter()
        out = ExperimentRunner(spec, progress, engine=b.engine).run()
        b.sync()
        dt = time.perf_counter() - t0
        matrix = {}
        for rec_file in sorted(Path(out).glob("runs/*/stage-*.json")):
            rec = json.loads(rec_file.read_text())
            matrix[rec["step"]] = {t: v["correct"] for t, v in rec["scores"].items()}
            for k, v in rec.get("timing", {}).items():
                phases[k] = phases.get(k, 0.0) + v
        shutil.rmtree(out, ignore_errors=True)
        return {"seconds": dt, "matrix": matrix, "timings": phases}

    def warm() -> None:
        ours_fn(run_spec(eval_rows=1, eval_tokens=2, train_rows=2, ref_rows=2))

    n, o = b.interleaved("run", naive_fn, ours_fn, warmup=(lambda: None, warm))
    b.add("run_seconds", "s/run", [x["seconds"] for x in n], [x["seconds"] for x in o], "lower",
          f"base + 3 stages ({' -> '.join(order)}), {s.run_train_rows} train rows/stage, "
          f"{s.run_eval_rows} test rows/task x {s.run_eval_tokens} tokens, {s.run_ref_rows} reference rows; "
          "ours a first run (nothing cached, base included)"
          + ("; naive also generates on the reference set" if b.args.naive_reference_generation else ""))
    diff = 0
    for step, row in o[0]["matrix"].items():
        nrow = n[0]["matrix"].get(int(step), {})
        for t, c in row.items():
            diff = max(diff, abs(c - nrow.get(t, c)))
    b.checks["run_max_correct_diff"] = diff
    b.details["run"] = {"naive_phases": n[0]["timings"], "ours_phases": o[0]["timings"],
                        "naive_matrix": n[0]["matrix"], "ours_matrix": o[0]["matrix"]}


# Phases in the order they run. Service-mode rows (`run_service`) and `scaling` rows are added
# here by a function taking the Bench and appending Rows (b.add / b.interleaved), e.g.
#     register_phase("run_service", phase_run_service)
PHASES: dict[str, Callable[[Bench], None]] = {
    "train": phase_train,
    "eval": phase_eval,
    "stability": phase_stability,
    "run": phase_run,
}


def _register_strategy_phase() -> None:
    from bench.strategy_bench import phase_strategies

    register_phase("strategies", phase_strategies)


def register_phase(name: str, fn: Callable[[Bench], None]) -> None:
    PHASES[name] = fn


_register_strategy_phase()
DEFAULT_PHASES = tuple(PHASES)  # what `make bench` runs; service rows are opt-in (--rows ...,run_service,scaling)


def _register_service_phases() -> None:
    from bench.service_bench import phase_run_service, phase_scaling

    register_phase("run_service", phase_run_service)
    register_phase("scaling", phase_scaling)


_register_service_phases()


# ---------------------------------------------------------------------------------------
# Output


def device_tag(b: Bench) -> tuple[str, str]:
    if b.device.type == "cuda":
        name = torch.cuda.get_device_name(b.device)
        return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower(), name
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return "cpu", f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# slmcl benchmark — {result['device_name']} — {result['date']}",
        "",
        f"Model: {result['model']} ({result['dtype']}); reps {result['reps']} (median, warm-up excluded); "
        f"benchmark wall time {result['wall_seconds']:.0f} s.",
        "ratio = how many times better ours is (naive/ours for times and counts, ours/naive for rates).",
        "",
        "| row | unit | naive | ours | ratio | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['name']} | {r['unit']} | {fmt(r['naive'])} | {fmt(r['ours'])} | {ratio} | {r['note']} |")
    lines += ["", "Sizes: " + ", ".join(f"{k}={v}" for k, v in result["sizes"].items()), "",
              "Checks (naive vs ours on the same inputs): " + _checks_line(result["checks"]), "",
              f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}. "
              f"Load average at start/end: {result['loadavg_start']} / {result['loadavg_end']}.", ""]
    return "\n".join(lines)


def _checks_line(checks: dict[str, Any]) -> str:
    said = [f"{k}={v}" for k, v in checks.items() if not isinstance(v, list)]
    # The service rows time the services; their answers are checked against the core by the service tests.
    return ", ".join(said) if said else "none in these rows (the service tests check the services' answers)"


def print_table(result: dict[str, Any]) -> None:
    w = max(len(r["name"]) for r in result["rows"])
    print(f"\n{'row':<{w}}  {'unit':<18} {'naive':>12} {'ours':>12} {'ratio':>8}")
    for r in result["rows"]:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['name']:<{w}}  {r['unit']:<18} {fmt(r['naive']):>12} {fmt(r['ours']):>12} {ratio:>8}")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per row, median reported (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in well under 2 minutes")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, help="model folder or HF id, or 'embedded' (default)")
    g.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default=None,
                   help="random-weight Llama of this shape with the SmolLM2 tokenizer (vocab 49152)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder for --model-shape (default: the embedded SmolLM2's, converted once)")
    p.add_argument("--rows", default=",".join(DEFAULT_PHASES),
                   help=f"phases to run (default {','.join(DEFAULT_PHASES)}), from {','.join(PHASES)}")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--data-dir", default=None, help="TRACE data (default $SLMCL_DATA_DIR or ../shared/...)")
    p.add_argument("--eval-batch", type=int, default=None, help="our evaluation batch size (default: the spec's)")
    p.add_argument("--ref-batch", type=int, default=None, help="our reference (stability) batch (default: the spec's)")
    p.add_argument("--tokens-per-forward", type=int, default=None,
                   help="our training.tokens_per_forward (default: the spec's)")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--naive-reference-generation", action="store_true",
                   help="naive run also generates on the reference set (256 tokens, batch 4) as the study does")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 dense peak (default: datasheet)")
    p.add_argument("--peak-bw", type=float, default=None, help="GPU memory bandwidth in GB/s (default: datasheet)")
    for f in Sizes.__dataclass_fields__:
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.reps < 1:
        p.error("--reps must be >= 1")
    phases = [x.strip() for x in args.rows.split(",") if x.strip()]
    unknown = [x for x in phases if x not in PHASES]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(PHASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")

    keep_freed_memory()  # as `slmcl run` does: both paths keep their freed memory (no page-fault storms between rows)
    load_start = os.getloadavg()
    b = Bench(args)
    b.log(f"sizes {dataclasses.asdict(b.sizes)}; reps {args.reps}; torch threads {torch.get_num_threads()}")
    try:
        for name in phases:
            t0 = time.perf_counter()
            b.log(f"== {name} ==")
            PHASES[name](b)
            b.log(f"== {name} done in {time.perf_counter() - t0:.1f}s ==")
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)

    import peft
    import transformers

    tag, device_name = device_tag(b)
    date = _dt.date.today().isoformat()
    result = {
        "rows": [r.as_dict() for r in b.rows],
        "device": tag,
        "device_name": device_name,
        "date": date,
        "model": b.model_name,
        "dtype": str(b.loaded.dtype).replace("torch.", ""),
        "model_params": b.n_params,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "sizes": {**dataclasses.asdict(b.sizes), "tasks": TASKS, "seed": SEED,
                  "eval_batch_ours": b.spec.evaluation.batch_size, "eval_batch_naive": naive.NAIVE_EVAL_BATCH,
                  "reference_batch_ours": b.spec.reference.batch_size,
                  "tokens_per_forward_ours": b.spec.training.tokens_per_forward,
                  "reference_batch_naive": naive.NAIVE_REFERENCE_BATCH,
                  "train_batch": b.spec.training.batch_size, "grad_accum": b.spec.training.grad_accum,
                  "lora": dataclasses.asdict(b.spec.lora)},
        "reps": args.reps,
        "quick": args.quick,
        "checks": b.checks,
        "details": b.details,
        "deviations": ([f"random weights and the SmolLM2 tokenizer: vocab {len(b.loaded.tokenizer)}"
                        + (" instead of Llama-3.2-1B's 128256" if args.model_shape == "llama-3.2-1b" else "")
                        + "; random weights rarely emit a stop token, so generations run to the cap"]
                       if args.model_shape else []),
        "wall_seconds": time.perf_counter() - b.t_start,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "argv": sys.argv[1:] if argv is None else argv,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{tag}-{date}"
    if args.model_shape or (args.model not in (None, "", "embedded")):
        stem += "-" + re.sub(r"[^A-Za-z0-9.]+", "-", b.model_name).strip("-").lower()
    if args.quick:
        stem += "-quick"
    if args.tag:
        stem += "-" + re.sub(r"[^A-Za-z0-9.]+", "-", args.tag).strip("-")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print_table(result)
    b.log(f"wrote {out / stem}.json and .md (wall {result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
