"""The experiment spec: one YAML file that says everything a run depends on.

The spec is the only configuration object that crosses a process boundary (the monitor
ships it to trainers and evaluators as JSON), so it is a tree of frozen dataclasses with
plain-data fields, validated once at the edge. Every error names the field it is about
(``training.lr: must be > 0``) and all errors of a file are reported together.

Defaults are the study's (DESIGN.md §1). Relative paths are resolved against the spec
file's folder; the TRACE data folder comes from ``data_dir`` or ``$SLMCL_DATA_DIR``.
Importing this module must stay cheap: no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from slmcl.errors import SpecError

DATA_DIR_ENV = "SLMCL_DATA_DIR"
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

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
TASK_KINDS = ("multiple_choice", "numeric")

MAX_NEW_TOKENS_LIMIT = 4096
MAX_SEEDS = 64


@dataclass(frozen=True)
class ModelSpec:
    name: str = field(default=EMBEDDED_MODEL, metadata={"help": "HF id, local folder, or the embedded SmolLM2"})
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Literal["multiple_choice", "numeric"] = "multiple_choice"
    instruction: str = ""
    train_file: str = ""
    test_file: str = ""


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: str | list[str] = "all-linear"


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    lr: float = 5e-5
    weight_decay: float = 0.0
    max_length: int = 512
    max_grad_norm: float = 1.0
    max_examples: int | None = field(default=None, metadata={"help": "first N train rows per task"})
    tokens_per_forward: int = field(
        default=1024,
        metadata={"help": "padded tokens merged into one forward; the loss weighting stays batch x accumulation"},
    )


@dataclass(frozen=True)
class EvaluationSpec:
    max_new_tokens: int = 256
    # Rows decoded together (all tasks of a checkpoint share batches). Per-token decode cost
    # keeps falling with the batch on a CPU too (b=32: 5.5 ms/row/step, b=64: 4.5 on 2 cores).
    batch_size: int = 64
    max_examples: int | None = field(default=None, metadata={"help": "first N test rows per task"})


@dataclass(frozen=True)
class ReferenceSpec:
    file: str = "reference.json"
    max_examples: int | None = None
    batch_size: int = 16


@dataclass(frozen=True)
class ChatSpec:
    system_prompt: str | None = field(default=None, metadata={"help": "None: no system message"})
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    enable_thinking: bool = False
    raw_prompts: bool = field(default=False, metadata={"help": "feed prompts as-is, no chat template"})


@dataclass(frozen=True)
class StrategySpec:
    name: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentSpec:
    name: str = "experiment"
    model: ModelSpec = field(default_factory=ModelSpec)
    data_dir: str = ""
    tasks: list[TaskSpec] = field(default_factory=list)
    orders: list[list[str]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [33, 42, 123])
    lora: LoraSpec = field(default_factory=LoraSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    chat: ChatSpec = field(default_factory=ChatSpec)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs/experiment"

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SpecError(f"tasks: no task named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------
# Generic dataclass builder: unknown keys and wrong types become SpecError lines.


class _Errors:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}" if path else message)

    def raise_if_any(self, source: str) -> None:
        if self.lines:
            head = f"invalid spec {source}: " if source else "invalid spec: "
            raise SpecError(head + "; ".join(self.lines))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, errors: _Errors) -> Any:
    """Check ``value`` against the annotation ``tp``; return the value to store (or None on error)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is type(None):
                continue
            trial = _Errors()
            out = _coerce(value, opt, path, trial)
            if not trial.lines:
                return out
        errors.add(path, f"expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.add(path, f"must be one of {', '.join(repr(a) for a in typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.add(path, f"expected a list, got {value!r}")
            return None
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.add(path, f"expected a mapping, got {value!r}")
            return None
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.add(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.add(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.add(path, f"expected a number, got {value!r}")
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.add(path, f"expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in this module, not user input


def _build(cls: type, raw: Any, path: str, errors: _Errors) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.add(path, f"expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            errors.add(where, f"unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            where = f"{path}.{f.name}" if path else f.name
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], where, errors)
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])})
    except TypeError as exc:  # a required field is missing
        errors.add(path, str(exc))
        return None


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


# ---------------------------------------------------------------------------------------
# Loading: parse, fill presets, resolve paths, validate values.


def load_spec(path: str | Path, *, check_files: bool = True, overrides: Mapping[str, Any] | None = None) -> ExperimentSpec:
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
        raw = _apply_overrides(raw, overrides)
    return spec_from_dict(raw, base_dir=path.resolve().parent, source=str(path), check_files=check_files)


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
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
    raw = dict(raw)

    # `model` may be written as a bare string; tasks as bare names of built-in tasks.
    if isinstance(raw.get("model"), str):
        raw["model"] = {"name": raw["model"]}
    if raw.get("model") is None and "model" in raw:
        raw["model"] = {}
    if raw.get("model", {}) and raw["model"].get("name") in (None, "", "embedded"):
        raw["model"] = {**raw["model"], "name": EMBEDDED_MODEL}
    tasks_raw = raw.get("tasks")
    if isinstance(tasks_raw, list):
        raw["tasks"] = [{"name": t} if isinstance(t, str) else t for t in tasks_raw]
        raw["tasks"] = [_fill_task_preset(t) for t in raw["tasks"]]

    spec = _build(ExperimentSpec, raw, "", errors)
    errors.raise_if_any(source)
    assert spec is not None
    spec = _resolve_paths(spec, base, environ, errors)
    if not spec.orders:  # no order given: the tasks in the order they are declared
        spec = dataclasses.replace(spec, orders=[[t.name for t in spec.tasks]])
    _validate_values(spec, errors)
    if check_files and not errors.lines:
        _check_files(spec, errors)
    errors.raise_if_any(source)
    return spec


def _fill_task_preset(task: Any) -> Any:
    if not isinstance(task, dict) or task.get("name") not in BUILTIN_TASKS:
        return task
    folder, kind, instruction = BUILTIN_TASKS[task["name"]]
    filled = {"kind": kind, "instruction": instruction,
              "train_file": f"{folder}/train.json", "test_file": f"{folder}/test.json"}
    filled.update(task)
    return filled


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
        return str(data_root / p)

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
    model = spec.model
    if model.name != EMBEDDED_MODEL:
        local = base / os.path.expanduser(model.name)
        if model.name.startswith((".", "/", "~")) or local.is_dir():
            model = dataclasses.replace(model, name=str(local.resolve()))
    output_dir = str((base / os.path.expanduser(spec.output_dir)).resolve())
    return dataclasses.replace(
        spec,
        data_dir=str(data_root) if data_root else "",
        tasks=tasks,
        reference=reference,
        model=model,
        output_dir=output_dir,
    )


def _validate_values(spec: ExperimentSpec, errors: _Errors) -> None:
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
        for t in order:
            if t not in names:
                errors.add(f"orders[{i}]", f"unknown task {t!r} (declared: {', '.join(names)})")
        dup = sorted({t for t in order if order.count(t) > 1})
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
    for i, s in enumerate(spec.seeds):
        if isinstance(s, int) and not 0 <= s < 2**32:
            errors.add(f"seeds[{i}]", "must be in [0, 2**32)")

    def positive(value: float | int | None, where: str, upper: float | None = None) -> None:
        if value is None:
            return
        if value <= 0:
            errors.add(where, f"must be > 0, got {value}")
        elif upper is not None and value > upper:
            errors.add(where, f"must be <= {upper:g}, got {value}")

    positive(spec.lora.rank, "lora.rank", 4096)
    positive(spec.lora.alpha, "lora.alpha")
    if not 0 <= spec.lora.dropout < 1:
        errors.add("lora.dropout", f"must be in [0, 1), got {spec.lora.dropout}")
    tr = spec.training
    positive(tr.epochs, "training.epochs", 100)
    positive(tr.batch_size, "training.batch_size", 4096)
    positive(tr.grad_accum, "training.grad_accum", 4096)
    positive(tr.lr, "training.lr", 1.0)
    positive(tr.max_length, "training.max_length", 131072)
    positive(tr.max_grad_norm, "training.max_grad_norm")
    positive(tr.max_examples, "training.max_examples")
    positive(tr.tokens_per_forward, "training.tokens_per_forward")
    if tr.weight_decay < 0:
        errors.add("training.weight_decay", f"must be >= 0, got {tr.weight_decay}")
    ev = spec.evaluation
    positive(ev.max_new_tokens, "evaluation.max_new_tokens", MAX_NEW_TOKENS_LIMIT)
    positive(ev.batch_size, "evaluation.batch_size", 4096)
    positive(ev.max_examples, "evaluation.max_examples")
    positive(spec.reference.max_examples, "reference.max_examples")
    positive(spec.reference.batch_size, "reference.batch_size", 4096)
    if not spec.reference.file:
        errors.add("reference.file", "missing")
    if spec.chat.raw_prompts and spec.chat.system_prompt:
        errors.add("chat.system_prompt", "has no effect with chat.raw_prompts: true")
    from slmcl.training.strategies import STRATEGIES  # local: the registry imports torch lazily

    if spec.strategy.name not in STRATEGIES:
        errors.add("strategy.name", f"unknown strategy {spec.strategy.name!r} (known: {', '.join(sorted(STRATEGIES))})")


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
