"""The resident model and the protocol's three operations on it: train, evaluate, measure drift.

An ``Engine`` loads the base model once and wraps it with one LoRA adapter whose weights
are swapped in place: a new run re-initialises them, a checkpoint loads them. The
embedded runner, the trainer worker and the evaluator server all hold one ``Engine``, so
every mode computes with the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmcl.config.spec import ExperimentSpec, LoraSpec, MonitoringSpec, StrategySpec, TaskSpec, TrainingSpec
from slmcl.errors import SpecError
from slmcl.inference.evaluation import TaskEvaluation, evaluate_tasks, one_task_progress
from slmcl.inference.stability import (
    StabilitySummary,
    base_cache_key,
    drift_rows,
    last_position_logprobs,
    reference_prompt_ids,
    stability_summary,
    tensor_from_bytes,
    tensor_to_bytes,
)
from slmcl.models import loading as modeling
from slmcl.models.checkpoints import (
    MERGED_FORMAT,
    base_parameter_names,
    checkpoint_format,
    dense_overrides,
    read_merged_overrides,
    save_merged,
    shape_signature,
    swapped_weights,
)
from slmcl.models.loading import LoadedModel
from slmcl.models.lora import ADAPTER_NAME, add_lora, load_adapter_weights, lora_config
from slmcl.models.lora import save_adapter as save_peft_adapter
from slmcl.models.lru import LRU
from slmcl.protocol.drift import DriftRows, summarize_drift
from slmcl.protocol.layout import base_reference_logp_key
from slmcl.storage.base import ArtifactStore
from slmcl.tasks.data import Example, file_sha256, load_examples
from slmcl.tasks.prompts import PromptRenderer
from slmcl.training.loop import SFTExample, StageMonitor, StageTrainResult, build_sft_example, train_stage
from slmcl.training.strategies import StageContext, StrategyState, get_strategy

log = logging.getLogger(__name__)


def stage_seed(seed: int, stage: int) -> int:
    """Each stage draws from its own seeded stream, so a resumed run trains exactly as an uninterrupted one."""
    return (seed * 1_000_003 + stage * 7919) % (2**63)


@dataclass
class ReferenceSet:
    rows: list[Example]
    prompt_ids: list[list[int]]
    cache_key: str


class Engine:
    def __init__(self, spec: ExperimentSpec, loaded: LoadedModel | None = None) -> None:
        self.spec = spec
        self.loaded = loaded if loaded is not None else modeling.load_model(spec.model, spec.device)
        self.renderer = PromptRenderer(self.loaded.tokenizer, spec.chat)
        self.model = modeling.attach_lora(self.loaded, spec.lora)
        self.adapter = ADAPTER_NAME  # the active LoRA adapter (one per shape; see slmcl.models.checkpoints)
        self._adapter_for_spec = {json.dumps(dataclasses.asdict(spec.lora), sort_keys=True): ADAPTER_NAME}
        # A merged checkpoint (OSF) in place of the adapter: the base weights it changes, by resident name.
        self._overrides: dict[str, torch.Tensor] | None = None
        self._dense: Any = None  # the plain model a merged stage just trained (saved as its checkpoint)
        self._n_stages: int | None = None  # of the run ``start_run`` began (O-LoRA sizes its adapter by it)
        self._training: TrainingSpec | None = None  # of the stage being trained (``training_for`` its strategy)
        self._strategy_name = spec.strategy.name  # of the run being trained: names a state saved without one
        self.forward_passes = 0  # stability forwards, counted so tests can hold us to one per row
        self._reference: ReferenceSet | None = None
        self._base_logp: torch.Tensor | None = None
        self._base_rows: tuple[str, DriftRows] | None = None  # (p_0 cache key, the base's own drift rows)
        # The held weights' reference drift, measured for the stability policy and handed once to the
        # stage's measurement (``drift_rows``), so a checkpoint still costs one forward per reference row.
        self._policy_rows: DriftRows | None = None
        self._task_base: dict[str, tuple[torch.Tensor, DriftRows]] = {}  # p_0 of each task's drift prompts
        self._task_prompt_memo: dict[str, tuple[str, list[list[int]]]] = {}  # see _task_prompts
        self._base_reference_accuracy: tuple[str, dict[str, tuple[float, int]]] | None = None
        self._svd_cache: dict[str, torch.Tensor] = {}  # left singular vectors of base weights (attribution)

    @classmethod
    def from_spec(cls, spec: ExperimentSpec) -> Engine:
        return cls(spec)

    @staticmethod
    def resident_key(spec: ExperimentSpec) -> str:
        """Specs with the same key can share one resident Engine (same base, same LoRA shape)."""
        import json

        return json.dumps({"model": spec.model.__dict__, "lora": spec.lora.__dict__, "device": spec.device},
                          sort_keys=True, default=str)

    def use_spec(self, spec: ExperimentSpec) -> None:
        """Serve another experiment on the resident model (services): same base and LoRA shape."""
        if self.resident_key(spec) != self.resident_key(self.spec):
            raise SpecError("this engine's base model or LoRA shape differs from the spec's")
        if spec is self.spec:
            return
        if (spec.reference, spec.chat, [(t.name, t.instruction) for t in spec.tasks]) != (
                self.spec.reference, self.spec.chat, [(t.name, t.instruction) for t in self.spec.tasks]):
            self._reference = None
            self._base_logp = None
        self.spec = spec
        self.renderer = PromptRenderer(self.loaded.tokenizer, spec.chat)

    # -- the checkpoint the engine holds -------------------------------------------------
    def _select_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter; only its weights may train."""
        if self.adapter != name:
            self.model.set_adapter(name)
            self.adapter = name
        for pname, param in self.model.named_parameters():
            if ".lora_" in pname:
                param.requires_grad_(f".{name}." in pname)

    def _adapter_for(self, lora: LoraSpec) -> str:
        """The resident adapter of this shape, added on first use."""
        key = json.dumps(dataclasses.asdict(lora), sort_keys=True)
        name = self._adapter_for_spec.get(key)
        if name is None:
            name = self._add_adapter(lora_config(lora))
            self._adapter_for_spec[key] = name
        return name

    def _add_adapter(self, config: Any) -> str:
        name = f"shape{len(self.model.peft_config)}"
        add_lora(self.model, name, config)
        return name

    def _adapter_for_folder(self, folder: Path) -> str:
        """The resident adapter a checkpoint folder's weights fit (by PEFT's resolved config), added if none."""
        from peft import LoraConfig

        config = LoraConfig.from_pretrained(str(folder))
        wanted = shape_signature(config)
        for name, have in self.model.peft_config.items():
            if shape_signature(have) == wanted:
                return str(name)
        config.inference_mode = False
        return self._add_adapter(config)

    def start_run(self, seed: int, strategy: StrategySpec | None = None, n_stages: int = 1) -> None:
        """A new run of ``strategy``: the adapter shape it trains, with fresh weights deterministic in the seed."""
        entry = strategy or self.spec.strategy
        impl = get_strategy(entry.name, entry.options)
        self._overrides, self._dense, self._n_stages, self._strategy_name = None, None, n_stages, entry.name
        self._policy_rows = None
        lora = self.spec.lora if impl.checkpoint == "merged" else impl.adapter_lora(self.spec.lora, n_stages)
        self._select_adapter(self._adapter_for(lora))
        modeling.reset_lora(self.model, seed, self.adapter)

    def reset_adapter(self, seed: int) -> None:
        self.start_run(seed)

    def load_checkpoint(self, folder: str | Path) -> StrategyState:
        """Hold a checkpoint of either format; return the strategy state saved beside it (empty if none)."""
        folder = Path(folder)
        self._policy_rows = None
        if checkpoint_format(folder) == MERGED_FORMAT:
            self._overrides = read_merged_overrides(folder, self.loaded.model)
        else:
            self._overrides = None
            self._select_adapter(self._adapter_for_folder(folder))
            load_adapter_weights(self.model, folder, self.adapter)
        self._dense = None
        return StrategyState.load(folder, device=self.loaded.device)

    load_adapter = load_checkpoint  # the name callers knew when every checkpoint was an adapter

    def save_checkpoint(self, out_dir: str | Path, strategy_state: StrategyState | None = None) -> Path:
        """Save what the last stage trained (adapter, or merged model) and its strategy state, atomically."""
        extra = None
        if strategy_state is not None:
            state = strategy_state if strategy_state.strategy else StrategyState(
                meta=strategy_state.meta, tensors=strategy_state.tensors, strategy=self._strategy_name)
            extra = state.save
        if self._dense is not None:
            saved = save_merged(self._dense, self.loaded.tokenizer, out_dir, extra=extra)
            self._dense = None  # a whole model: evaluation needs only the overrides, kept beside the base
            return saved
        return save_peft_adapter(self.model, out_dir, extra=extra, adapter=self.adapter)

    save_adapter = save_checkpoint

    def _plain_copy(self) -> Any:
        """A private plain model (no LoRA layers) holding the current checkpoint's weights: what a merged
        strategy trains. The resident base is never written. It is fp32 whatever the resident dtype: a
        merged method's checkpoint *is* its weights, and merging a stage's small update into bf16 rounds
        most of it away (measured for OSF on SmolLM2: 86 % of the entries' updates vanished)."""
        import copy

        plain = copy.deepcopy(self.model).unload().float()
        if self._overrides:
            names = {v: k for k, v in base_parameter_names(self.loaded.model).items()}
            params = dict(plain.named_parameters())
            with torch.no_grad():
                for resident_name, tensor in self._overrides.items():
                    params[names[resident_name]].copy_(tensor)
        return plain

    @contextlib.contextmanager
    def _checkpoint_model(self, *, merge_adapter: bool) -> Iterator[Any]:
        """The model as the held checkpoint computes: a merged checkpoint's weights swapped into the base with
        the adapter bypassed, or the adapter (folded into the weights for generation when ``merge_adapter``)."""
        if self._overrides is not None:
            with swapped_weights(self.loaded.model, self._overrides), self.model.disable_adapter():
                yield self.model
        elif merge_adapter:
            with modeling.merged_adapter(self.model) as model:
                yield model
        else:
            yield self.model

    @contextlib.contextmanager
    def base_model(self) -> Iterator[Any]:
        """The base model, adapter bypassed (used only for the one-off base evaluation and p_0)."""
        with self.model.disable_adapter():
            yield self.model

    # -- training -----------------------------------------------------------------------
    def train(
        self,
        *,
        run_id: str,
        seed: int,
        stage: int,
        task: TaskSpec,
        previous_tasks: list[str],
        strategy_state: StrategyState | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        n_stages: int | None = None,
        strategy: StrategySpec | None = None,
        store: ArtifactStore | None = None,
    ) -> StageTrainResult:
        """Train one stage; ``strategy_state`` is what the previous stage exported (from its checkpoint
        folder on resume), and the result's ``strategy_state`` is what the next stage needs. The spec's
        early-stop rules are checked during it (``store`` caches the base distributions they compare to)."""
        spec = self.spec
        entry = strategy or spec.strategy
        self._policy_rows = None
        self._strategy_name = entry.name
        state = StrategyState() if strategy_state is None else strategy_state.copy()
        if state.strategy and state.strategy != entry.name:
            raise SpecError(f"strategy.name: {entry.name!r}, but the previous stage's state was "
                            f"written by strategy {state.strategy!r}")
        training = spec.training_for(entry)
        self._training = training
        examples = load_examples(task.train_file, limit=training.max_examples)
        impl = get_strategy(entry.name, entry.options)  # SpecError naming the option
        ctx = StageContext(
            model=self.model, run_id=run_id, seed=seed, stage=stage, task=task.name,
            previous_tasks=previous_tasks, options=entry.options, state=state,
            n_stages=n_stages or self._n_stages or len(previous_tasks) + 1,
            task_examples=self.task_examples, encode=self.encode,
        )
        examples = list(impl.stage_examples(ctx, examples))
        sft = [self._sft(ex, task) for ex in examples]
        s = stage_seed(seed, stage)
        torch.manual_seed(s)  # LoRA dropout draws (and a strategy's own random initialisation)
        generator = torch.Generator().manual_seed(s)  # the shuffle
        merged = impl.checkpoint == "merged"
        if merged:  # the method changes base weights: train a private copy, never the resident base
            ctx.model = impl.stage_model(ctx, self._plain_copy())
        result = train_stage(
            ctx.model, sft, training, impl, ctx,
            pad_id=self.loaded.pad_token_id, device=self.loaded.device, generator=generator, on_step=on_step,
            monitor=self._early_stop_monitor(task, stage, store),
        )
        if merged:
            self._dense = impl.merged_model(ctx, ctx.model)
            self._dense.eval()
            self._overrides = dense_overrides(self._dense, self.loaded.model)
            ctx.model = None
        result.strategy_state.strategy = entry.name
        return result

    def task_examples(self, name: str) -> list[Example]:
        """A task's training rows as a stage trains them (``training.max_examples``), tagged with the task."""
        task = self.spec.task(name)
        rows = load_examples(task.train_file, limit=self._training_spec().max_examples)
        return [dataclasses.replace(r, task_name=task.name) for r in rows]

    def _sft(self, example: Example, default: TaskSpec) -> SFTExample:
        """A row as training input, rendered with its own task's instruction (replayed rows keep theirs)."""
        task = self.spec.task(example.task_name) if example.task_name else default
        return build_sft_example(self.loaded.tokenizer, self.renderer, task, example,
                                 self._training_spec().max_length)

    def _training_spec(self) -> TrainingSpec:
        """The training settings of the stage being prepared (a strategy entry may change the spec's)."""
        return self._training if self._training is not None else self.spec.training

    def encode(self, rows: Sequence[Example]) -> list[list[int]]:
        """Rows as the token ids a stage trains on (prompt + target); rows need ``task_name``."""
        return [self._sft(r, self.spec.task(r.task_name)).input_ids for r in rows]

    # -- evaluation ---------------------------------------------------------------------
    def test_examples(self, task: TaskSpec) -> list[Example]:
        return load_examples(task.test_file, limit=self.spec.evaluation.max_examples)

    def evaluate(
        self,
        task: TaskSpec,
        *,
        base: bool = False,
        examples: Sequence[Example] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> TaskEvaluation:
        rows = list(examples) if examples is not None else self.test_examples(task)
        return self._evaluate([(task, rows)], base=base, on_progress=one_task_progress(on_progress))[0]

    def evaluate_all(
        self,
        tasks: Sequence[TaskSpec] | None = None,
        *,
        base: bool = False,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> list[TaskEvaluation]:
        """A checkpoint on every task's test rows in one generation pass: small tasks share decode
        batches, and the adapter is folded into the weights once (``on_progress(task, done, total)``)."""
        work = [(t, self.test_examples(t)) for t in (self.spec.tasks if tasks is None else tasks)]
        return self._evaluate(work, base=base, on_progress=on_progress)

    def _evaluate(self, work: list[tuple[TaskSpec, list[Example]]], *, base: bool,
                  on_progress: Callable[[str, int, int], None] | None) -> list[TaskEvaluation]:
        ev = self.spec.evaluation
        ctx = self.base_model() if base else self._checkpoint_model(merge_adapter=True)
        with ctx as model:
            return evaluate_tasks(model, self.loaded, self.renderer, work, max_new_tokens=ev.max_new_tokens,
                                  batch_size=ev.batch_size, on_progress=on_progress)

    def base_eval_key(self, task: TaskSpec) -> str:
        """What a base evaluation depends on: model, test bytes, task rendering, decoding settings."""
        import hashlib
        import json

        blob = json.dumps({
            "model": self.loaded.fingerprint,
            "test": file_sha256(task.test_file),
            "kind": task.kind,
            "instruction": task.instruction,
            "rendering": self.renderer.fingerprint(),
            "max_new_tokens": self.spec.evaluation.max_new_tokens,
            "max_examples": self.spec.evaluation.max_examples,
            "device": self.loaded.device.type,
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    # -- stability ----------------------------------------------------------------------
    def instructions(self) -> Mapping[str, str]:
        return {t.name: t.instruction for t in self.spec.tasks}

    def reference(self) -> ReferenceSet:
        if self._reference is None:
            ref = self.spec.reference
            rows = load_examples(ref.file, limit=ref.max_examples)
            ids = reference_prompt_ids(self.loaded, self.renderer, rows, self.instructions())
            key = base_cache_key(self.loaded, file_sha256(ref.file), self.renderer, self.instructions(),
                                 ref.max_examples)
            self._reference = ReferenceSet(rows, ids, key)
        return self._reference

    def _logprobs(self, model: Any) -> torch.Tensor:
        ref = self.reference()

        def counted(n: int) -> None:
            self.forward_passes += n

        return last_position_logprobs(
            model, ref.prompt_ids, pad_id=self.loaded.pad_token_id, segments=[r.task_name for r in ref.rows],
            batch_size=self.spec.reference.batch_size, device=self.loaded.device, on_forward=counted,
        )

    def _prompt_logprobs(self, model: Any, prompts: Sequence[list[int]], segments: Sequence[str]) -> torch.Tensor:
        """Next-token log-probs on prompts other than the reference set (not counted in ``forward_passes``)."""
        return last_position_logprobs(model, prompts, pad_id=self.loaded.pad_token_id, segments=segments,
                                      batch_size=self.spec.reference.batch_size, device=self.loaded.device)

    def base_logprobs(self, store: ArtifactStore | None = None,
                      p0_cache: LRU[str, torch.Tensor] | None = None) -> torch.Tensor:
        """p_0 on the reference set: memory, then ``p0_cache`` (a replica's bounded cache shared by its
        engines), then the store's cache (shared by every process), then one pass of the base."""
        key = self.reference().cache_key
        if self._base_logp is not None:
            return self._base_logp
        cached = p0_cache.get(key) if p0_cache is not None else None
        if cached is not None:
            self._base_logp = cached
            return cached
        store_key = base_reference_logp_key(key)
        if store is not None and store.exists(store_key):
            self._base_logp = tensor_from_bytes(store.get_bytes(store_key))
        else:
            with self.base_model() as model:
                self._base_logp = self._logprobs(model)
            if store is not None:
                store.put_bytes(store_key, tensor_to_bytes(self._base_logp))
        if p0_cache is not None:
            p0_cache.put(key, self._base_logp)
        return self._base_logp

    def base_drift_rows(self, store: ArtifactStore | None = None,
                        p0_cache: LRU[str, torch.Tensor] | None = None) -> DriftRows:
        """The base's own rows (KL 0): what every checkpoint's entropy and margin deltas are measured against."""
        key = self.reference().cache_key
        if self._base_rows is None or self._base_rows[0] != key:
            self._base_rows = (key, drift_rows(self.base_logprobs(store, p0_cache), None))
        return self._base_rows[1]

    def drift_rows(self, store: ArtifactStore | None = None, *, base: bool = False,
                   p0_cache: LRU[str, torch.Tensor] | None = None) -> DriftRows:
        """Per-row drift of the current adapter (or of the base itself: KL 0) from the base, float64.

        Evaluator replicas return these rows; the summary is ``summarize_drift``'s, in every mode.
        """
        if base:
            return self.base_drift_rows(store, p0_cache)
        if self._policy_rows is not None:  # measured on these very weights for the stability policy
            rows, self._policy_rows = self._policy_rows, None
            return rows
        base_logp = self.base_logprobs(store, p0_cache)
        with self._checkpoint_model(merge_adapter=False) as model:
            return drift_rows(self._logprobs(model), base_logp)

    # -- the stability policy's signals (slmcl.protocol.policy) ---------------------------
    def reference_drift(self, store: ArtifactStore | None = None) -> dict[str, Any]:
        """The held weights' reference drift, summarized; its rows serve the stage's measurement next."""
        rows = self.drift_rows(store)
        self._policy_rows = rows
        return summarize_drift(rows, self.base_drift_rows(store))

    def _task_prompts(self, task: TaskSpec, n: int) -> tuple[str, list[list[int]]]:
        """``n`` evenly spaced training prompts of a task (the rows a stage trains on), rendered as for
        evaluation, and the key of what their base distributions depend on. Kept per engine: a stage asks
        for them before and after it trains, and reading, hashing and tokenizing the file again would repeat
        the same work."""
        memo = json.dumps([task.train_file, task.name, task.instruction, n, self.spec.training.max_examples,
                           self.renderer.fingerprint()], sort_keys=True, default=str)
        if memo not in self._task_prompt_memo:
            self._task_prompt_memo[memo] = self._read_task_prompts(task, n)
        return self._task_prompt_memo[memo]

    def _read_task_prompts(self, task: TaskSpec, n: int) -> tuple[str, list[list[int]]]:
        rows = load_examples(task.train_file, limit=self.spec.training.max_examples)
        picked = [rows[i * len(rows) // n] for i in range(n)] if len(rows) > n else rows
        ids = reference_prompt_ids(self.loaded, self.renderer, [dataclasses.replace(r, task_name=task.name)
                                                                  for r in picked], {task.name: task.instruction})
        key = json.dumps([file_sha256(task.train_file), n, self.spec.training.max_examples, task.instruction,
                          self.renderer.fingerprint(), self.loaded.fingerprint], sort_keys=True, default=str)
        return key, ids

    def _base_on(self, key: str, prompts: Sequence[list[int]], segment: str) -> tuple[torch.Tensor, DriftRows]:
        if key not in self._task_base:
            with self.base_model() as model:
                logp = self._prompt_logprobs(model, prompts, [segment] * len(prompts))
            self._task_base[key] = (logp, drift_rows(logp, None))
        return self._task_base[key]

    def task_drift(self, task: TaskSpec, store: ArtifactStore | None = None) -> dict[str, Any]:
        """Drift of the held weights from the base on the task's own training prompts (the new-task signal)."""
        key, ids = self._task_prompts(task, self.spec.monitoring.task_drift_examples)
        base_logp, base_rows = self._base_on(key, ids, task.name)
        with self._checkpoint_model(merge_adapter=False) as model:
            logp = self._prompt_logprobs(model, ids, [task.name] * len(ids))
        return summarize_drift(drift_rows(logp, base_logp), base_rows)

    def reference_accuracy(self, *, base: bool = False) -> dict[str, tuple[float, int]]:
        """Accuracy on the reference set's own rows by generation: per task of its rows, (score sum, rows).

        Each row is scored by its task's kind, so the reference set doubles as a small held-out benchmark
        read beside the drift on the same prompts. The base's is computed once per reference set.
        """
        key = self.reference().cache_key
        if base and self._base_reference_accuracy is not None and self._base_reference_accuracy[0] == key:
            return self._base_reference_accuracy[1]
        by_task: dict[str, list[Example]] = {}
        for row in self.reference().rows:
            by_task.setdefault(row.task_name, []).append(row)
        work = [(self._reference_task(name), rows) for name, rows in by_task.items()]
        evals = self._evaluate(work, base=base, on_progress=None)
        result = {e.task: (e.score_sum, e.total) for e in evals}
        if base:
            self._base_reference_accuracy = (key, result)
        return result

    def _reference_task(self, name: str) -> TaskSpec:
        for t in self.spec.tasks:
            if t.name == name:
                return t
        from slmcl.config.spec import BUILTIN_TASKS

        _, kind, instruction = BUILTIN_TASKS.get(name, ("", "multiple_choice", ""))
        return TaskSpec(name=name, kind=kind, instruction=instruction)

    def _subset(self, signal: str, n: int, task: TaskSpec, store: ArtifactStore | None,
                ) -> tuple[list[list[int]], list[str], torch.Tensor, DriftRows]:
        """Prompts, segments and base distributions of an early-stop check: ``n`` evenly spaced rows."""
        if signal == "task":
            key, ids = self._task_prompts(task, n)
            base_logp, base_rows = self._base_on(key, ids, task.name)
            return ids, [task.name] * len(ids), base_logp, base_rows
        ref = self.reference()
        total = len(ref.rows)
        idx = [i * total // n for i in range(n)] if total > n else list(range(total))
        base_logp = self.base_logprobs(store)[idx]
        return ([ref.prompt_ids[i] for i in idx], [ref.rows[i].task_name for i in idx], base_logp,
                drift_rows(base_logp, None))

    def _early_stop_monitor(self, task: TaskSpec, stage: int, store: ArtifactStore | None) -> StageMonitor | None:
        """The check ``train_stage`` runs after optimizer steps: the spec's early-stop rules on the weights
        being trained (the resident adapter, or a merged strategy's private copy)."""
        from slmcl.protocol.policy import Signals, crossings

        rules = [(i, r) for i, r in enumerate(self.spec.policy) if r.action == "early-stop"]
        if not rules:
            return None
        subsets = {i: self._subset(r.signal, r.examples, task, store) for i, r in rules}

        def check(model: Any, step: int, total: int) -> list[dict[str, Any]] | None:
            due = [(i, r) for i, r in rules if step % r.every == 0 or step == total]
            if not due:
                return None
            out = []
            with torch.no_grad():
                for i, rule in due:
                    ids, segments, base_logp, base_rows = subsets[i]
                    summary = summarize_drift(drift_rows(self._prompt_logprobs(model, ids, segments), base_logp),
                                              base_rows)
                    signals = Signals(reference=summary) if rule.signal == "reference" else Signals(task=summary)
                    out += [{**c, "rule": i} for c in crossings([rule], signals, stage=stage)]
            return out

        return check

    def attribution(self, monitoring: MonitoringSpec, store: ArtifactStore | None = None) -> list[dict[str, Any]]:
        """Where the held checkpoint's drift sits: per module and layer, from the weights (and, with
        ``layer_ablation``, the share of reference KL each layer's update carries)."""
        from slmcl.inference import attribution as attr

        merged = self._overrides is not None
        updates = (attr.override_updates(self._overrides or {}, self.loaded.model) if merged
                   else attr.lora_updates(self.model, self.adapter))
        rows = attr.attribution_rows(updates, top_k=monitoring.intruder_top_k,
                                     threshold=monitoring.intruder_threshold, svd_cache=self._svd_cache)
        if monitoring.layer_ablation:
            ids, segments, base_logp, base_rows = self._subset("reference", monitoring.layer_ablation_examples,
                                                               self.spec.tasks[0], store)

            def kl() -> float:
                with torch.no_grad(), self._checkpoint_model(merge_adapter=False) as model:
                    logp = self._prompt_logprobs(model, ids, segments)
                return float(summarize_drift(drift_rows(logp, base_logp), base_rows)["kl_to_base_mean"])

            def disabled(layer: int) -> Any:
                if not merged:
                    return attr.lora_layer_disabled(self.model, self.adapter, layer)
                return self._overrides_without(layer)

            layers = sorted({u.layer for u in updates if u.layer is not None})
            shares = attr.leave_one_layer_out(kl, layers, disabled)
            for row in rows:
                if row["scope"] == "layer":
                    row["kl_share_removed"] = shares.get(row["layer"])
        return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in rows]

    @contextlib.contextmanager
    def _overrides_without(self, layer: int) -> Iterator[None]:
        """A merged checkpoint with one layer's weights back at the base's."""
        from slmcl.inference.attribution import layer_of

        held = self._overrides
        assert held is not None
        self._overrides = {k: v for k, v in held.items() if layer_of(k) != layer}
        try:
            yield
        finally:
            self._overrides = held

    def stability(self, store: ArtifactStore | None = None, *, base: bool = False) -> StabilitySummary:
        """Drift of the current adapter (or of the base itself: KL 0) from the base, summarized."""
        rows = self.drift_rows(store, base=base)
        return StabilitySummary.of(rows, None if base else self.base_drift_rows(store))

def adapter_drift(
    *,
    model: str,
    adapter: str | None,
    reference: str,
    raw_prompts: bool = False,
    device: str = "auto",
    max_examples: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """KL/entropy/margin of any PEFT adapter against its base (``slmcl stability``).

    The adapter's own LoRA settings are read from its folder; the base distributions come
    from the same forward with the adapter bypassed, computed once.
    """
    from peft import PeftModel

    from slmcl.config.spec import EMBEDDED_MODEL, ChatSpec, ModelSpec
    from slmcl.errors import ModelError

    name = EMBEDDED_MODEL if model in ("", "embedded", EMBEDDED_MODEL) else model
    loaded = modeling.load_model(ModelSpec(name=name, trust_remote_code=trust_remote_code), device)
    renderer = PromptRenderer(loaded.tokenizer, ChatSpec(raw_prompts=raw_prompts))
    if not raw_prompts and not getattr(loaded.tokenizer, "chat_template", None):
        raise ModelError(f"model {model!r} has no chat template: pass --raw-prompts to feed prompts as-is")
    rows = load_examples(reference, limit=max_examples)
    ids = reference_prompt_ids(loaded, renderer, rows, {})

    def logp(m: Any) -> torch.Tensor:
        return last_position_logprobs(m, ids, pad_id=loaded.pad_token_id, batch_size=16, device=loaded.device,
                                      segments=[r.task_name for r in rows])

    if not adapter:
        return stability_summary(logp(loaded.model), None).as_dict()
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError(f"--adapter {adapter}: no adapter_config.json there (expected a PEFT adapter folder)")
    peft_model = PeftModel.from_pretrained(loaded.model, adapter)
    peft_model.eval()
    with peft_model.disable_adapter():
        base = logp(peft_model)
    return stability_summary(logp(peft_model), base).as_dict()
