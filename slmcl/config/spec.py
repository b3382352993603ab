"""The experiment spec: one YAML file that says everything a run depends on.

The spec is the only configuration object that crosses a process boundary (the monitor
ships it to trainers and evaluators as JSON), so it is a tree of frozen dataclasses with
plain-data fields, validated once at the edge. Every error names the field it is about
(``training.lr: must be > 0``) and all errors of a file are reported together.

The classes are pydantic v2 dataclasses: one declaration gives the types, the ranges, the
unknown-key check and the published JSON Schema (``slmcl.config.schema``), replacing a
home-made coercer; they stay real dataclasses, so ``dataclasses.replace`` and ``asdict``
keep working. Pydantic's own wording is not ours, so ``_explain`` translates its error list
into the one-line ``path: message`` form, and fields are ``Strict`` so that ``"2"`` is not an
integer and ``true`` not a number. Task kinds and strategies are checked against their
registries at load, so ``slmcl validate`` catches what training would otherwise hit hours in.

Defaults are the study's (DESIGN.md §1). Relative paths are resolved against the spec
file's folder; the TRACE data folder comes from ``data_dir`` or ``$SLMCL_DATA_DIR``.
Importing this module must stay cheap: no torch (the registries are imported when a spec
is validated, and they are torch-free too).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic.dataclasses import dataclass

from slmcl.errors import SpecError

DATA_DIR_ENV = "SLMCL_DATA_DIR"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"  # the default; `embedded` is short for it
# The models slmcl ships through pip; slmcl.models.gguf converts them (its registry has the same names).
EMBEDDED_MODELS = (EMBEDDED_MODEL, "embedded:gemma3-270m")

MULTIPLE_CHOICE_INSTRUCTION = (
    'Please show your choice in the answer field with only the choice letter, e.g., "C"'
)
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# The three TRACE tasks of the study: name -> (folder under the data dir, kind, instruction).
BUILTIN_TASKS: dict[str, tuple[str, str, str]] = {
    "fomc": ("FOMC", "multiple_choice", MULTIPLE_CHOICE_INSTRUCTION),
    "scienceqa": ("ScienceQA", "multiple_choice", MULTIPLE_CHOICE_INSTRUCTION),
    "numgluecm": ("NumGLUE-cm", "numeric", MATH_INSTRUCTION),
}

MAX_NEW_TOKENS_LIMIT = 4096
MAX_SEEDS = 64


def _yaml_float(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``5e-5``, without a dot, as a string: take the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _none_is_empty(value: Any) -> Any:
    """A section written with nothing under it (``training:``) means all its defaults."""
    return {} if value is None else value


Int = Annotated[int, Strict()]  # strict: True and 2.5 are not integers, nor is "2"
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Number = Annotated[float, Strict()]  # an int is a number, a bool is not
# Last in a number's Annotated, after its bounds (which then reach the JSON Schema as bounds).
FromText = BeforeValidator(_yaml_float)
Count = Annotated[Int, Field(gt=0, le=4096)]
Limit = Annotated[Int, Field(gt=0)] | None  # None: no limit
Section = BeforeValidator(_none_is_empty)
# Built at import (about 45 ms), not on first use: pydantic's deferred build is not thread-safe, and the
# monitor's threads reading specs at once saw "no attribute '__pydantic_validator__'". Import is serialized.
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, defer_build=False)


def _enum(names: typing.Callable[[], list[str]]) -> typing.Callable[[dict[str, Any]], None]:
    """JSON Schema ``enum`` of a registry's names, read when the schema is generated (not at import)."""
    return lambda schema: schema.update(enum=names())


def _task_kind_names() -> list[str]:
    from slmcl.tasks.kinds import TASK_KINDS  # local: imports the kind modules; stdlib only, but not needed to import

    return TASK_KINDS.names()


def _strategy_names() -> list[str]:
    from slmcl.training.strategies import STRATEGIES  # local: the strategy modules import torch only when run

    return STRATEGIES.names()


@dataclass(frozen=True, config=_CONFIG)
class ModelSpec:
    """The base model; "model: NAME" is short for "model: {name: NAME}"."""

    name: Annotated[Str, Field(description=(
        "HF id, local folder, or an embedded model: 'embedded' (SmolLM2-135M-Instruct) or 'embedded:gemma3-270m' "
        "(Gemma 3 270M base, Gemma Terms of Use)"))] = (
        EMBEDDED_MODEL
    )
    trust_remote_code: Bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: Str | None = None
    label: Annotated[Str | None, Field(description=(
        "this model's name in run ids and tables when an experiment has several (default: from its name)"))] = None

    @property
    def key(self) -> str:
        """The model's label: ``label``, else its name's last part, lowercased (``embedded:gemma3-270m`` ->
        ``gemma3-270m``, ``Qwen/Qwen3.5-0.8B`` -> ``qwen3.5-0.8b``, a folder -> the folder's name)."""
        if self.label:
            return self.label
        tail = re.split(r"[:/\\]", self.name.rstrip("/\\"))[-1].lower()
        return re.sub(r"[^a-z0-9_.-]+", "-", tail).strip("-.") or "model"

    @field_validator("name", mode="before")
    @classmethod
    def _embedded_alias(cls, name: Any) -> Any:
        name = EMBEDDED_MODEL if name is None or name in ("", "embedded") else name
        if isinstance(name, str) and name.startswith("embedded:") and name not in EMBEDDED_MODELS:
            raise ValueError(f"unknown embedded model {name!r}; known: embedded (= {EMBEDDED_MODEL}), "
                             f"{', '.join(EMBEDDED_MODELS[1:])}")
        return name


@dataclass(frozen=True, config=_CONFIG)
class TaskSpec:
    """One task; a bare built-in name (fomc, scienceqa, numgluecm) fills the other fields."""

    name: Str
    kind: Annotated[Str, Field(description="a task kind of slmcl.tasks.kinds", json_schema_extra=_enum(
        _task_kind_names))] = "multiple_choice"
    instruction: Str = ""
    train_file: Annotated[Str, Field(description="JSON rows; relative to data_dir")] = ""
    test_file: Annotated[Str, Field(description="JSON rows; relative to data_dir")] = ""

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        from slmcl.tasks.kinds import TASK_KINDS  # local: see _task_kind_names

        if kind not in TASK_KINDS:
            raise ValueError(TASK_KINDS.unknown_message(kind))
        return kind


@dataclass(frozen=True, config=_CONFIG)
class LoraSpec:
    """The adapter every stage trains (one adapter, carried across the stages)."""

    rank: Count = 8
    alpha: Annotated[Number, Field(gt=0), FromText] = 16.0
    dropout: Annotated[Number, Field(ge=0, lt=1), FromText] = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: Str | list[Str] = "all-linear"


@dataclass(frozen=True, config=_CONFIG)
class TrainingSpec:
    """One stage's fine-tuning."""

    epochs: Annotated[Int, Field(gt=0, le=100)] = 1
    batch_size: Count = 2
    grad_accum: Annotated[Count, Field(description="micro-batches per optimizer step")] = 8
    lr: Annotated[Number, Field(gt=0, le=1), FromText] = 5e-5
    weight_decay: Annotated[Number, Field(ge=0), FromText] = 0.0
    max_length: Annotated[Int, Field(gt=0, le=131072)] = 512
    max_grad_norm: Annotated[Number, Field(gt=0), FromText] = 1.0
    max_examples: Annotated[Limit, Field(description="first N train rows per task")] = None
    tokens_per_forward: Annotated[Int, Field(gt=0, description=(
        "padded tokens merged into one forward; the loss weighting stays batch x accumulation"))] = 1024


@dataclass(frozen=True, config=_CONFIG)
class EvaluationSpec:
    """Greedy decoding of every task's test rows after every stage."""

    max_new_tokens: Annotated[Int, Field(gt=0, le=MAX_NEW_TOKENS_LIMIT)] = 256
    # Rows decoded together (all tasks of a checkpoint share batches). Per-token decode cost
    # keeps falling with the batch on a CPU too (b=32: 5.5 ms/row/step, b=64: 4.5 on 2 cores).
    batch_size: Annotated[Count, Field(description="rows decoded together; any value gives the same tokens")] = 64
    max_examples: Annotated[Limit, Field(description="first N test rows per task")] = None
    every: Annotated[Int, Field(ge=1, le=4096, description=(
        "evaluate every task every N stages (and always at a run's last); drift is measured at every stage, "
        "and between full evaluations the tables give an accuracy *estimated* from KL to base"))] = 1
    calibration_prior: Annotated[Str, Field(description=(
        "a results directory whose fully evaluated checkpoints also calibrate the estimate (relative to the "
        "spec file)"))] = ""


@dataclass(frozen=True, config=_CONFIG)
class ReferenceSpec:
    """The fixed prompts on which stability (KL to the base model, entropy, margin) is measured."""

    file: Annotated[Str, Field(min_length=1)] = "reference.json"
    max_examples: Limit = None
    batch_size: Count = 16


@dataclass(frozen=True, config=_CONFIG)
class ChatSpec:
    """How prompts become model input."""

    system_prompt: Annotated[Str | None, Field(description="null: no system message")] = None
    template_kwargs: dict[Str, Any] = field(default_factory=dict)
    enable_thinking: Bool = False
    raw_prompts: Annotated[Bool, Field(description="feed prompts as-is, no chat template")] = False
    template: Annotated[Str, Field(description=(
        "the template of a model whose tokenizer has none (a pretrained base): chatml, llama3, gemma or a Jinja "
        "template string; a model with its own template keeps it"))] = ""

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from slmcl.tasks.templates import resolve_template  # local: stdlib-only module, not needed to import

        resolve_template(value)
        return value


@dataclass(frozen=True, config=_CONFIG)
class MonitoringSpec:
    """What is measured beside the reference-set drift at every stage (``slmcl.protocol.policy`` reads it)."""

    task_drift_examples: Annotated[Int, Field(ge=0, le=4096, description=(
        "prompts of the stage's own training task on which KL to base is measured before and after the stage "
        "(0: off)"))] = 32
    attribution: Annotated[Bool, Field(description=(
        "per module and layer: relative update norm, effective rank, intruder dimensions (drift_attribution.csv)"
    ))] = True
    intruder_top_k: Annotated[Int, Field(ge=1, le=4096, description=(
        "singular vectors of the updated weight examined for intruder dimensions"))] = 10
    intruder_threshold: Annotated[Number, Field(gt=0, lt=1, description=(
        "a singular vector whose |cosine| with every base singular vector is below this is an intruder"
    )), FromText] = 0.5
    layer_ablation: Annotated[Bool, Field(description=(
        "per layer, the share of reference KL removed when that layer's update is disabled (a forward per layer)"
    ))] = False
    layer_ablation_examples: Annotated[Int, Field(ge=1, le=4096)] = 16
    reference_accuracy: Annotated[Bool, Field(description=(
        "accuracy on the reference set's rows by generation (per task of its rows) at every checkpoint, beside "
        "the drift (reference_accuracy.csv); costs a generation pass over the reference rows per checkpoint"
    ))] = True


@dataclass(frozen=True, config=_CONFIG)
class MlflowSpec:
    """An MLflow tracking server the results are also logged to (needs the ``mlflow`` extra)."""

    uri: Annotated[Str, Field(min_length=1, description="tracking URI, e.g. http://127.0.0.1:5000")]
    experiment: Annotated[Str, Field(description="MLflow experiment name (default: the spec's name)")] = ""
    log_adapters: Annotated[Bool, Field(description="upload every stage's LoRA checkpoint as artifacts")] = True


@dataclass(frozen=True, config=_CONFIG)
class TrackingSpec:
    """Experiment trackers that receive params, per-stage metrics, figures and adapters (all optional)."""

    mlflow: MlflowSpec | None = None


PolicyAction = Literal["alert", "stop", "revert", "early-stop"]


@dataclass(frozen=True, config=_CONFIG)
class PolicyRule:
    """One stability rule: when any of its thresholds is crossed, its action is taken (and recorded)."""

    action: Annotated[PolicyAction, Field(description=(
        "alert: an event only; stop: end the run after the stage; revert: the next stage starts from the last "
        "healthy checkpoint; early-stop: check during the stage and end it before it crosses"))]
    signal: Annotated[Literal["reference", "task"], Field(description=(
        "reference: KL on the fixed reference set; task: KL on the stage's own training prompts"))] = "reference"
    kl_mean: Annotated[Number | None, Field(gt=0, description="mean KL to base above this crosses"), FromText] = None
    kl_p95: Annotated[Number | None, Field(gt=0, description="p95 KL to base above this crosses"), FromText] = None
    margin_drop: Annotated[Number | None, Field(gt=0, description=(
        "a fall of the mean top-2 margin from the base's (-ΔMargin) above this crosses"), ), FromText] = None
    accuracy_drop: Annotated[Number | None, Field(gt=0, le=1, description=(
        "a fall of accuracy on the reference set's rows (by generation) from the base's above this crosses"
    )), FromText] = None
    every: Annotated[Int, Field(ge=1, le=100000, description="early-stop: optimizer steps between checks")] = 4
    examples: Annotated[Int, Field(ge=1, le=4096, description="early-stop: rows checked (evenly spaced)")] = 16

    @property
    def thresholds(self) -> dict[str, float]:
        """The thresholds this rule sets, by the statistic they bound."""
        return {k: v for k in ("kl_mean", "kl_p95", "margin_drop", "accuracy_drop")
                if (v := getattr(self, k)) is not None}


@dataclass(frozen=True, config=_CONFIG)
class StrategySpec:
    """The continual-learning method; its options are checked by the strategy at load."""

    name: Annotated[Str, Field(json_schema_extra=_enum(_strategy_names))] = "lora"
    options: dict[Str, Any] = field(default_factory=dict)
    label: Annotated[Str | None, Field(description=(
        "this entry's name in run ids and tables (default: the strategy's name); "
        "needed to compare one strategy under two option sets"))] = None
    training: Annotated[dict[Str, Any], Field(description=(
        "this strategy's changes to `training:` (e.g. OSF's paper lr 1e-5: it trains whole weight "
        "matrices, where LoRA's learning rates break the model)"))] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The entry's label: what run ids, records and tables call it."""
        return self.label or self.name

    @field_validator("name")
    @classmethod
    def _registered_strategy(cls, name: str) -> str:
        from slmcl.training.strategies import STRATEGIES  # local: see _strategy_names

        if name not in STRATEGIES:
            raise ValueError(STRATEGIES.unknown_message(name))
        return name


def _strategy_input(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _model_input(value: Any) -> Any:
    return {} if value is None else {"name": value} if isinstance(value, str) else value


def _task_input(value: Any) -> Any:
    """A bare name is a task; a built-in task's name fills its folder, kind and instruction, each overridable."""
    if isinstance(value, str):
        value = {"name": value}
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or name not in BUILTIN_TASKS:
        return value
    folder, kind, instruction = BUILTIN_TASKS[name]
    return {"kind": kind, "instruction": instruction,
            "train_file": f"{folder}/train.json", "test_file": f"{folder}/test.json", **value}


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


@dataclass(frozen=True, config=_CONFIG)
class ExperimentSpec:
    """An slmcl experiment: every (order, seed) pair is one run of sequential fine-tuning."""

    name: Str = "experiment"
    model: Annotated[ModelSpec, BeforeValidator(_model_input, json_schema_input_type=Str | ModelSpec)] = field(
        default_factory=ModelSpec)
    models: Annotated[
        list[Annotated[ModelSpec, BeforeValidator(_model_input, json_schema_input_type=Str | ModelSpec)]],
        Field(description="several base models in one experiment: each is a run per strategy, order and seed "
                          "(default: [model])"),
    ] = field(default_factory=list)
    data_dir: Annotated[Str, Field(description=f"the TRACE data folder; default ${DATA_DIR_ENV}")] = ""
    tasks: list[Annotated[TaskSpec, BeforeValidator(_task_input, json_schema_input_type=Str | TaskSpec)]] = field(
        default_factory=list)
    orders: Annotated[list[list[Str]], Field(description="task orders; default: the tasks as declared")] = field(
        default_factory=list)
    seeds: list[Annotated[Int, Field(ge=0, lt=2**32)]] = field(default_factory=lambda: [33, 42, 123])
    lora: Annotated[LoraSpec, Section] = field(default_factory=LoraSpec)
    training: Annotated[TrainingSpec, Section] = field(default_factory=TrainingSpec)
    evaluation: Annotated[EvaluationSpec, Section] = field(default_factory=EvaluationSpec)
    reference: Annotated[ReferenceSpec, Section] = field(default_factory=ReferenceSpec)
    chat: Annotated[ChatSpec, Section] = field(default_factory=ChatSpec)
    monitoring: Annotated[MonitoringSpec, Section] = field(default_factory=MonitoringSpec)
    policy: Annotated[list[PolicyRule], Field(description=(
        "stability rules checked after every stage (early-stop: during it); see README 'Stability policy'"
    ))] = field(default_factory=list)
    tracking: Annotated[TrackingSpec, Section] = field(default_factory=TrackingSpec)
    strategy: Annotated[StrategySpec, Section] = field(default_factory=StrategySpec)
    strategies: Annotated[
        list[Annotated[StrategySpec, BeforeValidator(_strategy_input, json_schema_input_type=Str | StrategySpec)]],
        Field(description="methods to compare: each is a run per order and seed (default: [strategy])"),
    ] = field(default_factory=list)
    device: Annotated[Str, AfterValidator(_check_device),
                      Field(description="auto, cpu, cuda or cuda:N (one GPU of several)")] = "auto"
    output_dir: Str = "runs/experiment"

    @property
    def model_label(self) -> str:
        """The label run ids carry for this spec's ``model``: "" in a one-model experiment (its ids stay short)."""
        return self.model.key if len(self.models) > 1 else ""

    def for_model(self, label: str) -> ExperimentSpec:
        """This experiment as one of its models runs it: ``model`` is that entry (``models`` stays whole)."""
        if not label:
            return self
        for m in self.models:
            if m.key == label:
                return dataclasses.replace(self, model=m)
        raise SpecError(f"models: no model labelled {label!r}")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SpecError(f"tasks: no task named {name!r}")

    def training_for(self, entry: StrategySpec) -> TrainingSpec:
        """``training`` as a run of ``entry`` trains: the spec's, with the entry's changes (checked at load)."""
        return dataclasses.replace(self.training, **entry.training) if entry.training else self.training

    def strategy_entry(self, label: str) -> StrategySpec:
        """The ``strategies`` entry called ``label`` (a run's strategy)."""
        for st in self.strategies or [self.strategy]:
            if st.key == label:
                return st
        raise SpecError(f"strategies: no entry labelled {label!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------
# Pydantic's error list in our words: one ``path: message`` line per bad field.


class _Errors:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}" if path else message)

    def raise_if_any(self, source: str) -> None:
        if self.lines:
            head = f"invalid spec {source}: " if source else "invalid spec: "
            raise SpecError(head + "; ".join(self.lines))


_EXPECTED = {  # pydantic error type -> what the field wanted
    "int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
    "dataclass_type": "a mapping", "dataclass_exact_type": "a mapping",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _fields(cls: type) -> dict[str, type | None]:
    """Field name -> the spec class it holds (``list[TaskSpec]`` holds TaskSpec), or None for plain data."""
    out: dict[str, type | None] = {}
    for name, tp in typing.get_type_hints(cls).items():
        out[name] = next((t for t in (tp, *typing.get_args(tp)) if isinstance(t, type) and dataclasses.is_dataclass(t)),
                         None)
    return out


def _locate(loc: tuple[int | str, ...], unknown: bool) -> tuple[str, type, type | None]:
    """The dotted path of an error location, the spec class holding its last key, and the class at it.

    Pydantic inserts the member tag of a union (``'str'``, ``'list[str]'``) into the location;
    only field names, list indices and (for ``unknown``) the unknown key make the user's path.
    """
    path = ""
    cls: type | None = ExperimentSpec
    holder: type = ExperimentSpec
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif cls is not None and (part in _fields(cls) or (unknown and i == len(loc) - 1)):
            path += f".{part}" if path else part
            holder, cls = cls, _fields(cls).get(part)
    return path, holder, cls


def _bound(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _explain(exc: ValidationError) -> list[str]:
    by_path: dict[str, list[str]] = {}
    wants: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for err in exc.errors():
        kind, ctx, value, loc = err["type"], err.get("ctx") or {}, err.get("input"), err["loc"]
        if kind == "invalid_key" or loc[-1:] == ("[key]",):  # a YAML key that is not a string (`1: x`)
            path, _, cls = _locate(loc[:-1] if kind == "invalid_key" else loc[:-2], unknown=False)
            by_path.setdefault(path, []).append(
                f"keys must be strings, got {value!r}" if cls is None
                else f"unknown key {value!r} (known: {', '.join(sorted(_fields(cls)))})")
            continue
        path, holder, _ = _locate(loc, unknown=kind == "unexpected_keyword_argument")
        if kind in _EXPECTED:  # several for one path when it allows a union: merged below
            shorthand = kind == "dataclass_type" and _SHORTHAND.fullmatch(path)
            wants.setdefault(path, []).append("a name or a mapping" if shorthand else _EXPECTED[kind])
            values[path] = value
            by_path.setdefault(path, [])
            continue
        if kind == "unexpected_keyword_argument":
            msg = f"unknown key (known: {', '.join(sorted(_fields(holder)))})"
        elif kind in _BOUNDS:
            key, op = _BOUNDS[kind]
            msg = f"must be {op} {_bound(ctx[key])}, got {value}"
        elif kind == "literal_error":
            msg = f"must be one of {ctx['expected']}, got {_show(value)}"
        elif kind == "missing":
            msg = "missing"
        elif kind == "finite_number":
            msg = f"must be a finite number, got {value}"
        elif kind == "string_too_short":
            msg = "must not be empty"
        elif kind in ("value_error", "assertion_error"):
            msg = str(ctx["error"])
        else:  # rarer cases keep pydantic's wording, still under the field's name
            msg = f"{err['msg']}, got {_show(value)}"
        by_path.setdefault(path, []).append(msg)
    lines = []
    for path, msgs in by_path.items():
        deeper = any(p.startswith((f"{path}[", f"{path}.")) for p in by_path)
        if path in wants and not deeper:  # a list item failing says more than "not a string" of the union
            msgs = [f"expected {' or '.join(dict.fromkeys(wants[path]))}, got {_show(values[path])}", *msgs]
        lines += [f"{path}: {m}" if path else m for m in msgs]
    return lines


@functools.cache
def _adapter() -> TypeAdapter[ExperimentSpec]:
    return TypeAdapter(ExperimentSpec)


# ---------------------------------------------------------------------------------------
# Loading: parse, apply overrides, validate types, resolve paths, check values across fields.


def load_spec(
    path: str | Path, *, check_files: bool = True, overrides: Mapping[str, Any] | None = None
) -> ExperimentSpec:
    """Read, validate and resolve a spec file; raise ``SpecError`` naming every bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of settings, got {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    return spec_from_dict(raw, base_dir=path.resolve().parent, source=str(path), check_files=check_files)


_SHORTHAND = re.compile(r"model|models\[\d+\]|tasks\[\d+\]")  # where a bare name stands for {name: ...}
_STEP = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def _override_steps(dotted: str) -> list[str | int]:
    """``training.lr`` -> ['training', 'lr']; ``tasks[1].kind`` -> ['tasks', 1, 'kind'] (the paths errors print)."""
    steps: list[str | int] = []
    for part in dotted.split("."):
        m = _STEP.fullmatch(part.strip())
        if not m:
            raise SpecError(f"--set {dotted}: not a setting path (write it as errors name it, e.g. training.lr "
                            "or tasks[0].kind)")
        steps.append(m.group(1))
        steps += [int(i) for i in re.findall(r"\d+", m.group(2))]
    return steps


def _shown(steps: list[str | int]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``--set`` values on a parsed spec; a path that cannot be followed is one ``SpecError`` line naming it.

    Keys that do not exist are added and left to validation, which names them as unknown.
    A bare name where a mapping is needed (``model: embedded``, a task written as ``fomc``)
    is read as ``{name: ...}``, so ``model.revision=...`` and ``tasks[0].kind=...`` work on
    the shorthands too.
    """
    out = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        steps = _override_steps(dotted)
        node: Any = out
        for depth, step in enumerate(steps):
            here = _shown(steps[:depth + 1])
            last = depth == len(steps) - 1
            if isinstance(step, int):
                if not isinstance(node, list):
                    raise SpecError(f"--set {dotted}: {_shown(steps[:depth]) or 'the spec'} is not a list")
                if not 0 <= step < len(node):
                    raise SpecError(f"--set {dotted}: {_shown(steps[:depth])} has {len(node)} item(s), no [{step}]")
            elif not isinstance(node, dict):
                what = "a list: index it, e.g. [0]" if isinstance(node, list) else f"{_show(node)}, not a section"
                raise SpecError(f"--set {dotted}: {_shown(steps[:depth])} is {what}")
            if last:
                node[step] = value
                break
            child = node[step] if isinstance(step, int) else node.get(step)
            if child is None and isinstance(steps[depth + 1], int):
                raise SpecError(f"--set {dotted}: {here} is not in the spec file; set it whole, e.g. {here}=[...]")
            if child is None:
                child = {}
            elif isinstance(child, str) and _SHORTHAND.fullmatch(here):
                child = {"name": child}
            node[step] = child
            node = child
    return out


def spec_from_dict(
    raw: Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    source: str = "",
    check_files: bool = True,
    environ: Mapping[str, str] | None = None,
) -> ExperimentSpec:
    """Build a resolved spec from plain data (a parsed YAML file, or JSON from another process)."""
    environ = os.environ if environ is None else environ
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    errors = _Errors()
    try:
        spec = _adapter().validate_python(dict(raw))
    except ValidationError as exc:
        errors.lines += _explain(exc)
        bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
        if "tasks" not in bad:  # the checks across fields read sound ones only: run them too, to list everything
            with contextlib.suppress(ValidationError):
                _validate_values(_adapter().validate_python({k: v for k, v in raw.items() if k not in bad}), errors)
        errors.raise_if_any(source)
        raise  # not reached: a ValidationError holds at least one error
    spec = _resolve_paths(spec, base, environ, errors)
    if not spec.orders:  # no order given: the tasks in the order they are declared
        spec = dataclasses.replace(spec, orders=[[t.name for t in spec.tasks]])
    spec = _validate_values(spec, errors)
    if check_files and not errors.lines:
        _check_files(spec, errors)
    errors.raise_if_any(source)
    return spec


def _resolve_paths(spec: ExperimentSpec, base: Path, environ: Mapping[str, str], errors: _Errors) -> ExperimentSpec:
    data_dir = spec.data_dir or environ.get(DATA_DIR_ENV, "")
    data_root: Path | None = None
    if data_dir:
        data_root = (base / os.path.expanduser(data_dir)).resolve()

    needs_root: list[str] = []

    def resolve_data(value: str, where: str) -> str:
        if not value or value.startswith("store:"):  # a service spec's store key: the worker localizes it
            return value
        p = Path(os.path.expanduser(value))
        if p.is_absolute():
            return str(p)
        if data_root is None:
            needs_root.append(where)
            return value
        joined = Path(os.path.normpath(data_root / p))  # lexical: symlinked task folders inside data_dir still work
        if joined != data_root and data_root not in joined.parents:
            errors.add(where, f"{value!r} leaves data_dir {data_root}: a relative path names a file inside data_dir "
                              "(give an absolute path for a file elsewhere)")
        return str(joined)

    tasks = [
        dataclasses.replace(
            t,
            train_file=resolve_data(t.train_file, f"tasks[{i}].train_file"),
            test_file=resolve_data(t.test_file, f"tasks[{i}].test_file"),
        )
        for i, t in enumerate(spec.tasks)
    ]
    reference = dataclasses.replace(spec.reference, file=resolve_data(spec.reference.file, "reference.file"))
    if needs_root:
        errors.add(
            "data_dir",
            f"not set, and {', '.join(needs_root[:3])}{' …' if len(needs_root) > 3 else ''} are relative paths: "
            f"set `data_dir:` in the spec or the {DATA_DIR_ENV} environment variable to your copy of the TRACE "
            "data (e.g. llm-cl-500, the folder holding FOMC/, ScienceQA/, NumGLUE-cm/ and reference.json)",
        )
    def resolve_model(model: ModelSpec) -> ModelSpec:
        if model.name not in EMBEDDED_MODELS:
            local = base / os.path.expanduser(model.name)
            if model.name.startswith((".", "/", "~")) or local.is_dir():
                return dataclasses.replace(model, name=str(local.resolve()))
        return model

    model = resolve_model(spec.model)
    models = [resolve_model(m) for m in spec.models]
    output_dir = str((base / os.path.expanduser(spec.output_dir)).resolve())
    evaluation = spec.evaluation
    if evaluation.calibration_prior and not evaluation.calibration_prior.startswith(("store:", "experiment:")):
        evaluation = dataclasses.replace(evaluation, calibration_prior=str(
            (base / os.path.expanduser(evaluation.calibration_prior)).resolve()))
    return dataclasses.replace(
        spec,
        evaluation=evaluation,
        data_dir=str(data_root) if data_root else "",
        tasks=tasks,
        reference=reference,
        model=model,
        models=models,
        output_dir=output_dir,
    )


def _validate_values(spec: ExperimentSpec, errors: _Errors) -> ExperimentSpec:
    """What one field's type cannot say: names, orders and seeds across fields, and the strategy's options."""
    if not spec.name.strip():
        errors.add("name", "must not be empty")
    if not spec.tasks:
        errors.add("tasks", "at least one task is needed")
    names = [t.name for t in spec.tasks]
    for i, t in enumerate(spec.tasks):
        where = f"tasks[{i}]"
        if not t.name or not t.name.replace("_", "").replace("-", "").isalnum():
            errors.add(f"{where}.name", f"must be a non-empty name of letters, digits, '-' or '_', got {t.name!r}")
        if t.name == "base":
            errors.add(f"{where}.name", "'base' is reserved for the untrained model")
        if names.count(t.name) > 1 and names.index(t.name) == i:
            errors.add(f"{where}.name", f"duplicate task {t.name!r}")
        if not t.train_file:
            errors.add(f"{where}.train_file", "missing (built-in tasks: fomc, scienceqa, numgluecm)")
        if not t.test_file:
            errors.add(f"{where}.test_file", "missing")
    for i, order in enumerate(spec.orders):
        if not order:
            errors.add(f"orders[{i}]", "empty order")
        for task_name in order:
            if task_name not in names:
                errors.add(f"orders[{i}]", f"unknown task {task_name!r} (declared: {', '.join(names)})")
        dup = sorted({n for n in order if order.count(n) > 1})
        if dup:
            errors.add(f"orders[{i}]", f"task(s) {', '.join(dup)} appear more than once")
    if len({tuple(o) for o in spec.orders}) < len(spec.orders):
        errors.add("orders", "the same order is listed twice")
    if not spec.seeds:
        errors.add("seeds", "at least one seed is needed")
    if len(spec.seeds) > MAX_SEEDS:
        errors.add("seeds", f"{len(spec.seeds)} seeds is more than {MAX_SEEDS}; each seed is a full run")
    if len(set(spec.seeds)) < len(spec.seeds):
        errors.add("seeds", "duplicate seeds")
    if spec.chat.raw_prompts and spec.chat.system_prompt:
        errors.add("chat.system_prompt", "has no effect with chat.raw_prompts: true")
    if spec.chat.raw_prompts and spec.chat.template:
        errors.add("chat.template", "has no effect with chat.raw_prompts: true")
    spec = _validate_models(spec, errors)
    for i, rule in enumerate(spec.policy):
        where = f"policy[{i}]"
        if not rule.thresholds:
            errors.add(where, "needs at least one threshold (kl_mean, kl_p95, margin_drop or accuracy_drop)")
        if rule.accuracy_drop is not None and rule.signal == "task":
            errors.add(f"{where}.accuracy_drop", "is measured on the reference set: use signal: reference")
        if rule.accuracy_drop is not None and rule.action == "early-stop":
            errors.add(f"{where}.accuracy_drop", "early-stop checks during training, where generating answers "
                                                 "is too slow: use kl_mean, kl_p95 or margin_drop")
        if rule.signal == "task" and spec.monitoring.task_drift_examples == 0 and rule.action != "early-stop":
            errors.add(f"{where}.signal", "task drift is off (monitoring.task_drift_examples: 0)")

    return _validate_strategies(spec, errors)


_LABEL = re.compile(r"[a-z0-9][a-z0-9_-]*")
_MODEL_LABEL = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def _validate_models(spec: ExperimentSpec, errors: _Errors) -> ExperimentSpec:
    """``model`` is the shorthand of a one-entry ``models``; several models need distinct labels, and the
    resolved spec always lists them (``model`` is the first: what a one-model reader uses)."""
    if not spec.models:
        return dataclasses.replace(spec, models=[spec.model])
    if spec.model != ModelSpec() and spec.model not in spec.models:
        errors.add("model", "give either `model:` (one model) or `models:` (several), not both")
        return spec
    keys = [m.key for m in spec.models]
    for i, m in enumerate(spec.models):
        if m.label is not None and not _MODEL_LABEL.fullmatch(m.label):
            errors.add(f"models[{i}].label", f"must be lowercase letters, digits, '.', '-' or '_', got {m.label!r}")
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        errors.add("models", f"two models are labelled {key!r}: give them different `label:`s")
    # ``model`` names the entry a per-model view (``for_model``) runs, so it stays when it is one of them.
    return spec if spec.model in spec.models else dataclasses.replace(spec, model=spec.models[0])


def _validate_strategies(spec: ExperimentSpec, errors: _Errors) -> ExperimentSpec:
    """``strategy`` is the shorthand of a one-entry ``strategies``; every entry's options are checked here,
    and the resolved spec records them with the strategy's defaults filled in (and both fields agreeing)."""
    from slmcl.training.strategies import (  # local: see _strategy_names
        StrategyOptionError,
        check_strategy_spec,
        validate_strategy_options,
    )

    if spec.strategies:
        if spec.strategy != StrategySpec() and spec.strategy != spec.strategies[0]:
            errors.add("strategy", "give either `strategy:` (one method) or `strategies:` (a comparison), not both")
            return spec
        entries, where = list(spec.strategies), [f"strategies[{i}]" for i in range(len(spec.strategies))]
    else:
        entries, where = [spec.strategy], ["strategy"]
    resolved: list[StrategySpec] = []
    for st, path in zip(entries, where, strict=True):
        try:
            options = validate_strategy_options(st.name, st.options)
        except StrategyOptionError as exc:
            errors.lines += [f"{path}{p.removeprefix('strategy')}: {m}" for p, m in exc.problems]
            continue
        except SpecError as exc:  # the message names its field (strategy.name / strategy.options.<key>)
            errors.add("", str(exc).replace("strategy.", f"{path}.", 1))
            continue
        crossed = check_strategy_spec(st.name, options, spec.lora)
        if crossed:
            errors.lines += [f"{p.replace('strategy', path, 1) if p.startswith('strategy.') else p}: {m}"
                             for p, m in crossed]
            continue
        if st.label is not None and not _LABEL.fullmatch(st.label):
            errors.add(f"{path}.label", f"must be lowercase letters, digits, '-' or '_', got {st.label!r}")
        if st.training:  # checked as the training section it makes: every bound and type, the field named
            try:
                _adapter().validate_python({"training": {**dataclasses.asdict(spec.training), **st.training}})
            except ValidationError as exc:
                errors.lines += [line.replace("training", f"{path}.training", 1) for line in _explain(exc)]
                continue
        resolved.append(dataclasses.replace(st, options=options))
    keys = [st.key for st in resolved]
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        errors.add("strategies", f"{key!r} is listed twice: give the entries different `label:`s")
    if len(resolved) < len(entries):
        return spec
    return dataclasses.replace(spec, strategy=resolved[0], strategies=resolved)


def _check_files(spec: ExperimentSpec, errors: _Errors) -> None:
    hint = (f" (point `data_dir:` or {DATA_DIR_ENV} at your copy of the TRACE data, e.g. llm-cl-500; "
            "see README 'Data')")
    for i, t in enumerate(spec.tasks):
        for attr in ("train_file", "test_file"):
            p = getattr(t, attr)
            if p and not Path(p).is_file():
                errors.add(f"tasks[{i}].{attr}", f"file not found: {p}{hint}")
    if spec.reference.file and not Path(spec.reference.file).is_file():
        errors.add("reference.file", f"file not found: {spec.reference.file}{hint}")
