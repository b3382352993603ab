"""Continual-learning strategies: how a stage trains, as hooks around one fixed loop.

The training loop (``slmcl.training.loop``) never changes for a new method: O-LoRA adds an
orthogonality term through ``extra_loss``, OSFT projects gradients in ``after_backward``,
replay mixes old rows in through ``stage_examples``, and each hands what the next stage
needs to it through ``export`` (a ``StrategyState``). A strategy is one module of this
package that registers itself (``@STRATEGIES.register("name")``) and declares its options
as a frozen dataclass, so the spec names it and checks its options at load time, before
any model is touched, and the name, not code, is what travels between processes.

Importing this package, listing the names and validating options need no torch (the spec
does all three): strategy modules import torch inside their methods.

Two checkpoint formats exist, and every checkpoint loads for inference without our code:

- ``adapter`` (default): the stage trains a PEFT LoRA adapter on the frozen resident base; the
  checkpoint is the adapter folder (``PeftModel.from_pretrained``). ``adapter_lora`` may give
  the adapter another shape than the spec's ``lora`` (O-LoRA stacks one rank-r pair per task).
- ``merged``: the method changes the base weights themselves (OSF). The engine hands
  ``stage_model`` a private copy of the base holding the previous stage's weights, trains what
  it returns, and saves ``merged_model``'s dense result as a model folder
  (``AutoModelForCausalLM.from_pretrained``); the resident base is never written.

A strategy's state is saved beside the adapter in the checkpoint folder, as
``strategy_state.json`` (the strategy's name and its JSON ``meta``) and, only when it has
tensors, ``strategy_state.safetensors``; a resumed run reads it back from there. No pickle:
a checkpoint folder is data that may come from another machine.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from slmcl.errors import ModelError, SpecError
from slmcl.registry import Registry

if TYPE_CHECKING:
    import torch

    from slmcl.config.spec import LoraSpec
    from slmcl.tasks.data import Example

CheckpointFormat = Literal["adapter", "merged"]

STRATEGIES: Registry[type] = Registry("strategy", package="slmcl.training.strategies")

STATE_JSON = "strategy_state.json"
STATE_TENSORS = "strategy_state.safetensors"
_STATE_FORMAT = 1


# -- state ------------------------------------------------------------------------------------


@dataclass
class StrategyState:
    """What one stage of a strategy hands to the next: JSON ``meta`` and named tensors.

    ``strategy`` names the strategy that exported it, so a checkpoint's state is never fed to
    another method by mistake ("" for a state nobody exported, such as a run's first stage).
    """

    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    strategy: str = ""

    @property
    def empty(self) -> bool:
        return not self.meta and not self.tensors

    def copy(self) -> StrategyState:
        """A copy a stage may change without touching the caller's (tensors are shared, never written)."""
        return StrategyState(meta=json.loads(json.dumps(self.meta)), tensors=dict(self.tensors),
                             strategy=self.strategy)

    def save(self, folder: str | Path) -> None:
        """Write ``strategy_state.json`` and, if there are tensors, ``strategy_state.safetensors``."""
        folder = Path(folder)
        who = f"strategy {self.strategy or '?'!r}"
        try:
            meta_json = json.loads(json.dumps(self.meta, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{who}: its state's meta is not plain JSON ({exc})") from None
        bad = [k for k in self.tensors if not isinstance(k, str) or not k]
        if bad:
            raise ModelError(f"{who}: state tensor names must be non-empty strings, got {bad[:3]}")
        doc = {"format": _STATE_FORMAT, "strategy": self.strategy, "meta": meta_json,
               "tensors": sorted(self.tensors)}
        if self.tensors:
            from safetensors.torch import save_file

            # Own contiguous CPU copies: safetensors refuses views and tensors that share storage.
            flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.tensors.items()}
            save_file(flat, str(folder / STATE_TENSORS), metadata={"strategy": self.strategy})
        (folder / STATE_JSON).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device | None = None) -> StrategyState:
        """Read a checkpoint folder's state; an empty state when the folder has none."""
        folder = Path(folder)
        meta_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
        if not meta_path.is_file():
            if tensor_path.exists():
                raise ModelError(f"{folder}: {STATE_TENSORS} without its {STATE_JSON}")
            return cls()
        try:
            doc = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{meta_path}: unreadable ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != _STATE_FORMAT or not isinstance(doc.get("meta"), dict):
            raise ModelError(f"{meta_path}: not a strategy state of format {_STATE_FORMAT}")
        names = doc.get("tensors") or []
        tensors: dict[str, torch.Tensor] = {}
        if names:
            if not tensor_path.is_file():
                raise ModelError(f"{folder}: {STATE_JSON} lists tensors but {STATE_TENSORS} is missing")
            from safetensors.torch import load_file

            tensors = load_file(str(tensor_path), device=str(device or "cpu"))
            if sorted(tensors) != sorted(names):
                raise ModelError(f"{tensor_path}: holds other tensors than {STATE_JSON} lists")
        return cls(meta=doc["meta"], tensors=tensors, strategy=str(doc.get("strategy") or ""))


# -- the hooks --------------------------------------------------------------------------------


@dataclass
class StageContext:
    """What a strategy may look at during a stage."""

    model: Any  # the PEFT model being trained
    run_id: str
    seed: int
    stage: int  # 1-based
    task: str
    previous_tasks: list[str]
    options: dict[str, Any]  # as the spec wrote them; the strategy's typed copy is ``strategy.options``
    optimizer: Any = None
    state: StrategyState = field(default_factory=StrategyState)  # what the previous stage exported
    n_stages: int = 0  # stages in this run's order (O-LoRA sizes its stacked adapter by it)
    # Training rows of a task of this experiment, as the spec limits them (``training.max_examples``),
    # each with ``task_name`` set: replay mixes them in, OSF measures layer importance on them.
    task_examples: Callable[[str], list[Example]] = field(default=lambda name: [])
    # A task's rows as model input: token ids of prompt + training target, the way the stage trains them.
    encode: Callable[[Sequence[Example]], list[list[int]]] = field(default=lambda rows: [])


class Strategy(Protocol):
    checkpoint: ClassVar[CheckpointFormat]

    def adapter_lora(self, lora: LoraSpec, n_stages: int) -> LoraSpec: ...

    def stage_model(self, ctx: StageContext, base: Any) -> Any: ...

    def updated_parameters(self, ctx: StageContext, params: Sequence[torch.Tensor]) -> int: ...

    def merged_model(self, ctx: StageContext, model: Any) -> Any: ...

    def stage_examples(self, ctx: StageContext, examples: Sequence[Example]) -> Sequence[Example]: ...

    def on_stage_start(self, ctx: StageContext) -> None: ...

    def extra_loss(self, ctx: StageContext) -> torch.Tensor | None: ...

    def after_backward(self, ctx: StageContext) -> None: ...

    def after_step(self, ctx: StageContext) -> None: ...

    def on_stage_end(self, ctx: StageContext) -> None: ...

    def on_stage_abort(self, ctx: StageContext) -> None: ...

    def export(self, ctx: StageContext) -> StrategyState: ...


# -- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyOptions:
    """Base of a strategy's ``Options``: a frozen dataclass whose fields have defaults.

    Field types are checked by ``validate_strategy_options``; ``validate`` checks what types
    cannot say (ranges, combinations) and raises ``option_error(key, why)``.
    """

    def validate(self) -> None:
        return None


class StrategyOptionError(SpecError):
    """Invalid ``strategy.options``; ``problems`` holds (field path, message) pairs for the spec's report."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


def option_error(key: str, message: str) -> StrategyOptionError:
    return StrategyOptionError([(f"strategy.options.{key}", message)])


class StrategyBase:
    """No-op hooks and the options plumbing: a strategy overrides only what it changes."""

    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    checkpoint: ClassVar[CheckpointFormat] = "adapter"

    def __init__(self, options: StrategyOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def adapter_lora(self, lora: LoraSpec, n_stages: int) -> LoraSpec:
        """The LoRA adapter this strategy trains, given the spec's ``lora`` (``adapter`` format only)."""
        return lora

    def check_spec(self, lora: LoraSpec) -> list[tuple[str, str]]:
        """What these options cannot be combined with in the spec's ``lora`` (checked when the spec loads,
        without torch): (field path, message) pairs; ``strategy.`` paths are rewritten for list entries."""
        return []

    def updated_parameters(self, ctx: StageContext, params: Sequence[torch.Tensor]) -> int:
        """How many of the optimizer's parameters this stage really updates (the comparison reports it)."""
        return sum(p.numel() for p in params)

    def stage_model(self, ctx: StageContext, base: Any) -> Any:
        """``merged`` format: wrap ``base`` (a plain model with the previous stage's weights, the
        engine's private copy) into what this stage trains; parameters with ``requires_grad`` train."""
        raise NotImplementedError(f"{type(self).__name__} trains an adapter, not the base weights")

    def merged_model(self, ctx: StageContext, model: Any) -> Any:
        """``merged`` format: fold the trained ``model`` into a plain model with dense weights."""
        raise NotImplementedError(f"{type(self).__name__} trains an adapter, not the base weights")

    def stage_examples(self, ctx: StageContext, examples: Sequence[Example]) -> Sequence[Example]:
        return examples

    def on_stage_start(self, ctx: StageContext) -> None:
        return None

    def extra_loss(self, ctx: StageContext) -> torch.Tensor | None:
        return None

    def after_backward(self, ctx: StageContext) -> None:
        return None

    def after_step(self, ctx: StageContext) -> None:
        return None

    def on_stage_end(self, ctx: StageContext) -> None:
        return None

    def on_stage_abort(self, ctx: StageContext) -> None:
        """The stage raised: undo what ``on_stage_start`` changed in the shared model (no checkpoint follows)."""
        return None

    def export(self, ctx: StageContext) -> StrategyState:
        return StrategyState()


class _Mismatch(Exception):
    pass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Mapping):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as a field of type ``tp`` (an int where a float is declared becomes a float), or _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        for a in args:  # type-exact: True must not match 1
            if type(value) is type(a) and value == a:
                return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = [_coerce(v, args[0]) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _describe(value: Any) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        return type(value).__name__
    return f"{value!r} ({type(value).__name__})"


def parse_strategy_options(name: str, options: Mapping[str, Any] | None) -> StrategyOptions:
    """The typed ``Options`` of strategy ``name`` from a spec's mapping, or ``SpecError`` naming the field."""
    if name not in STRATEGIES:
        raise SpecError(f"strategy.name: {STRATEGIES.unknown_message(name)}")
    cls = STRATEGIES.get(name)
    opt_cls: Any = getattr(cls, "Options", StrategyOptions)
    if not (isinstance(opt_cls, type) and issubclass(opt_cls, StrategyOptions) and dataclasses.is_dataclass(opt_cls)):
        raise TypeError(f"strategy {name!r}: Options must be a frozen dataclass subclassing StrategyOptions")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise StrategyOptionError([("strategy.options", f"must be a mapping, got {type(options).__name__}")])
    fields = {f.name: f for f in dataclasses.fields(opt_cls) if f.init}
    hints = typing.get_type_hints(opt_cls)
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    for key, value in options.items():
        path = f"strategy.options.{key}"
        if key not in fields:
            if not fields:
                problems.append((path, f"unknown option: strategy {name!r} takes no options"))
                continue
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append((path, f"unknown option of strategy {name!r}.{hint} Known: {', '.join(fields)}"))
            continue
        try:
            values[key] = _coerce(value, hints[key])
        except _Mismatch:
            problems.append((path, f"must be {_type_name(hints[key])}, got {_describe(value)}"))
    if problems:
        raise StrategyOptionError(problems)
    parsed: StrategyOptions = opt_cls(**values)
    parsed.validate()
    return parsed


def check_strategy_spec(name: str, options: Mapping[str, Any] | None, lora: LoraSpec) -> list[tuple[str, str]]:
    """The strategy's checks across spec sections (its options against ``lora``), without torch."""
    return get_strategy_instance(name, options).check_spec(lora)


def get_strategy_instance(name: str, options: Mapping[str, Any] | None) -> StrategyBase:
    parsed = parse_strategy_options(name, options)
    instance: StrategyBase = STRATEGIES.get(name)(parsed)
    return instance


def validate_strategy_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a spec's ``strategy.options`` for ``strategy.name`` without torch; return them with defaults filled in.

    Raises ``SpecError`` (a ``StrategyOptionError`` for option problems, whose ``problems``
    list every bad field) with messages that start ``strategy.options.<key>:``.
    """
    parsed = parse_strategy_options(name, options)
    return {f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed) if f.init}


def get_strategy(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """A fresh instance of strategy ``name`` with validated options (one per stage: hooks may keep attributes)."""
    parsed = parse_strategy_options(name, options)
    return STRATEGIES.get(name)(parsed)
