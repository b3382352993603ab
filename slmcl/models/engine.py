"""The resident model and the protocol's three operations on it: train, evaluate, measure drift.

An ``Engine`` loads the base model once and wraps it with one LoRA adapter whose weights
are swapped in place: a new run re-initialises them, a checkpoint loads them. The
embedded runner, the trainer worker and the evaluator server all hold one ``Engine``, so
every mode computes with the same code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmcl.config.spec import ExperimentSpec, TaskSpec
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
from slmcl.models.loading import LoadedModel
from slmcl.models.lora import load_adapter_weights
from slmcl.models.lora import save_adapter as save_peft_adapter
from slmcl.models.lru import LRU
from slmcl.protocol.drift import DriftRows
from slmcl.protocol.layout import base_reference_logp_key
from slmcl.storage.base import ArtifactStore
from slmcl.tasks.data import Example, file_sha256, load_examples
from slmcl.tasks.prompts import PromptRenderer
from slmcl.training.loop import StageTrainResult, build_sft_example, train_stage
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
        self.forward_passes = 0  # stability forwards, counted so tests can hold us to one per row
        self._reference: ReferenceSet | None = None
        self._base_logp: torch.Tensor | None = None
        self._base_rows: tuple[str, DriftRows] | None = None  # (p_0 cache key, the base's own drift rows)

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

    # -- adapter state ------------------------------------------------------------------
    def reset_adapter(self, seed: int) -> None:
        modeling.reset_lora(self.model, seed)

    def load_adapter(self, adapter_dir: str | Path) -> StrategyState:
        """Swap a checkpoint's weights in; return the strategy state saved beside them (empty if none)."""
        load_adapter_weights(self.model, adapter_dir)
        return StrategyState.load(adapter_dir, device=self.loaded.device)

    def save_adapter(self, out_dir: str | Path, strategy_state: StrategyState | None = None) -> Path:
        """Save the adapter, and the stage's strategy state beside it, as one atomic folder."""
        if strategy_state is None:
            return save_peft_adapter(self.model, out_dir)
        state = strategy_state if strategy_state.strategy else StrategyState(
            meta=strategy_state.meta, tensors=strategy_state.tensors, strategy=self.spec.strategy.name)
        return save_peft_adapter(self.model, out_dir, extra=state.save)

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
    ) -> StageTrainResult:
        """Train one stage; ``strategy_state`` is what the previous stage exported (from its checkpoint
        folder on resume), and the result's ``strategy_state`` is what the next stage needs."""
        spec = self.spec
        state = StrategyState() if strategy_state is None else strategy_state.copy()
        if state.strategy and state.strategy != spec.strategy.name:
            raise SpecError(f"strategy.name: {spec.strategy.name!r}, but the previous stage's state was "
                            f"written by strategy {state.strategy!r}")
        examples = load_examples(task.train_file, limit=spec.training.max_examples)
        strategy = get_strategy(spec.strategy.name, spec.strategy.options)  # SpecError naming the option
        ctx = StageContext(
            model=self.model, run_id=run_id, seed=seed, stage=stage, task=task.name,
            previous_tasks=previous_tasks, options=spec.strategy.options, state=state,
        )
        examples = list(strategy.stage_examples(ctx, examples))
        sft = [
            build_sft_example(self.loaded.tokenizer, self.renderer, task, ex, spec.training.max_length)
            for ex in examples
        ]
        s = stage_seed(seed, stage)
        torch.manual_seed(s)  # LoRA dropout draws
        generator = torch.Generator().manual_seed(s)  # the shuffle
        result = train_stage(
            self.model, sft, spec.training, strategy, ctx,
            pad_id=self.loaded.pad_token_id, device=self.loaded.device, generator=generator, on_step=on_step,
        )
        result.strategy_state.strategy = spec.strategy.name
        return result

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
        ctx = self.base_model() if base else modeling.merged_adapter(self.model)
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
        base_logp = self.base_logprobs(store, p0_cache)
        return drift_rows(self._logprobs(self.model), base_logp)

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
