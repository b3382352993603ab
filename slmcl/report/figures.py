"""The study's figures, drawn with matplotlib's object API (``Figure``, rendered by Agg) and saved as PNG and SVG.

No pyplot: a ``Figure`` made directly is never registered in pyplot's global figure list, so it is
freed as soon as it is saved (nothing to ``plt.close``, no memory growing with the number of
runs), and the host process's backend (the CLI's, a notebook's) is never switched.

Every figure has a fixed size in inches at ``DPI``, so its PNG's size in pixels is known in advance
(``FigureFile.size``) and no layout step crops it. Colours: one per model; line style: solid for an
original order (and for an order without a reverse), dashed for its reverse; error bars are the
sample std over seeds. Accuracy plots draw only fully evaluated checkpoints: a stage between full
evaluations has no point (the line joins its evaluated neighbours), never a 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib.style as mstyle
import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from slmcl.metrics.correlation import pearson
from slmcl.protocol.tables import kl_accuracy_points
from slmcl.report.study import OrderGroup, Role, Run, Stat, Study, order_text, slug

DPI = 100
LINESTYLE: dict[Role, str] = {"original": "-", "reversed": "--", "single": "-"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
ACC_LABEL = "average accuracy over all tasks (fraction correct)"
KL_LABEL = "KL to base (nats, mean over the reference set)"
STAGE_LABEL = "checkpoint k (tasks learned; 0 = base)"


@dataclass(frozen=True)
class FigureFile:
    """A saved figure: its stem under figures/, its title (the HTML caption) and its PNG size in pixels."""

    name: str
    title: str
    caption: str
    width: int
    height: int

    @property
    def png(self) -> str:
        return f"figures/{self.name}.png"

    @property
    def svg(self) -> str:
        return f"figures/{self.name}.svg"

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@contextmanager
def _style() -> Iterator[None]:
    """matplotlib's defaults, whatever the user's matplotlibrc says, and reproducible SVG ids."""
    with mstyle.context("default"), rc_context({"svg.hashsalt": "slmcl-report", "font.size": 9,
                                                "axes.titlesize": 10, "legend.fontsize": 8}):
        yield


def _new(width: float, height: float) -> Figure:
    return Figure(figsize=(round(width, 1), round(height, 1)), dpi=DPI, layout="constrained")


def save(fig: Figure, out: Path, name: str, title: str, caption: str) -> FigureFile:
    (out / "figures").mkdir(parents=True, exist_ok=True)
    w, h = fig.get_size_inches()
    fig.savefig(out / "figures" / f"{name}.png", format="png", dpi=DPI)
    fig.savefig(out / "figures" / f"{name}.svg", format="svg", dpi=DPI, metadata={"Date": None})
    fig.clear()
    return FigureFile(name, title, caption, round(w * DPI), round(h * DPI))


def model_colours(study: Study) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % len(palette)] for i, m in enumerate(study.models)}


def _strategy_marker(study: Study, strategy: str) -> str:
    return MARKERS[study.strategies.index(strategy) % len(MARKERS)]


def _series_label(study: Study, g: OrderGroup) -> str:
    role = "" if g.role == "single" else f" ({g.role})"
    return f"{study.group_label(g)}: {order_text(g.order)}{role}"


def _errorbar(ax: Axes, xs: Sequence[float], stats: Sequence[Stat], *, color: str, linestyle: str, marker: str,
              label: str) -> None:
    """Mean ± std points joined by a line; undefined points are dropped, never drawn as 0."""
    pts = [(x, s.mean, s.std or 0.0) for x, s in zip(xs, stats) if s.mean is not None and math.isfinite(s.mean)]
    if not pts:
        return
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3, color=color,
                linestyle=linestyle, marker=marker, label=label)


def _x_scale(ax: Axes, values: Sequence[float], axis: str = "x") -> None:
    """Symmetric log when the positive values span more than two decades (the base sits at KL = 0)."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    if len(pos) >= 2 and max(pos) / min(pos) > 100:
        if axis == "x":
            ax.set_xscale("symlog", linthresh=min(pos))
        else:
            ax.set_yscale("symlog", linthresh=min(pos))


# --------------------------------------------------------------------------- a. KL vs accuracy


def kl_accuracy_figure(study: Study) -> Figure:
    """Every fully evaluated checkpoint (mean ± std over seeds) of every model and order; Pearson r per model."""
    colours = model_colours(study)
    fig = _new(11.0, 5.5)
    ax = fig.add_subplot()
    xs_all: list[float] = []
    handles: list[Line2D] = []
    for model in study.models:
        base_drawn = False
        for g in (g for g in study.groups if g.model == model):
            for k in g.steps:
                acc = g.metric(k, "avg_all_tasks")
                kl = g.evaluated_stability(k, "kl_to_base_mean")
                if acc.mean is None or kl.mean is None:
                    continue
                if k == 0:  # the base is shared by every run of the model: drawn once
                    if base_drawn:
                        continue
                    base_drawn = True
                ax.errorbar([kl.mean], [acc.mean], xerr=[kl.std or 0.0], yerr=[acc.std or 0.0],
                            color=colours[model], marker="*" if k == 0 else _strategy_marker(study, g.strategy),
                            markersize=10 if k == 0 else 6, capsize=2, linestyle="none",
                            markerfacecolor="white" if g.role == "reversed" else colours[model])
                xs_all.append(kl.mean)
        pts = kl_accuracy_points([r for r in study.records if r.model == model])
        r = pearson([p[0] for p in pts], [p[1] for p in pts])
        r_text = "r undefined" if r is None else f"Pearson r = {r:+.2f}"
        handles.append(Line2D([], [], color=colours[model], marker="o", linestyle="none",
                              label=f"{study.model_labels[model]} ({r_text}, n = {len(pts)})"))
    if len(study.models) > 1:
        pts = kl_accuracy_points(study.records)
        r = pearson([p[0] for p in pts], [p[1] for p in pts])
        r_text = "r undefined" if r is None else f"Pearson r = {r:+.2f}"
        handles.append(Line2D([], [], linestyle="none", label=f"all models: {r_text}, n = {len(pts)}"))
    handles.append(Line2D([], [], color="grey", marker="*", markersize=10, linestyle="none", label="base (k = 0)"))
    if study.has_reversed:
        handles += [Line2D([], [], color="grey", marker="o", linestyle="none", label="original order"),
                    Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle="none",
                           label="reversed order")]
    if study.several_strategies:
        handles += [Line2D([], [], color="grey", marker=_strategy_marker(study, s), linestyle="none", label=s)
                    for s in study.strategies]
    _x_scale(ax, xs_all)
    ax.set_xlabel(KL_LABEL + (" (symlog scale)" if ax.get_xscale() == "symlog" else ""))
    ax.set_ylabel(ACC_LABEL)
    ax.set_title("KL to base vs average accuracy, every fully evaluated checkpoint (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside right upper")
    return fig


# --------------------------------------------------------------------------- b. average accuracy per step


def avg_accuracy_figure(study: Study) -> Figure:
    """Average accuracy over all tasks per checkpoint, one line per model and order (solid/dashed)."""
    colours = model_colours(study)
    fig = _new(11.0, 5.5)
    ax = fig.add_subplot()
    for g in study.groups:
        steps = list(range(len(g.order) + 1))
        _errorbar(ax, steps, [g.metric(k, "avg_all_tasks") for k in steps], color=colours[g.model],
                  linestyle=LINESTYLE[g.role], marker=_strategy_marker(study, g.strategy),
                  label=_series_label(study, g))
    ax.set_xlabel(STAGE_LABEL)
    ax.set_ylabel(ACC_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Average accuracy per checkpoint" + (": original (solid) vs reversed (dashed) order"
                                                      if study.has_reversed else ""))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside right upper")
    return fig


# --------------------------------------------------------------------------- c. accuracy matrices


def matrix_figure(study: Study, model: str) -> Figure:
    """One annotated heatmap per run of a model: a row of panels per (strategy, order), one panel per seed.

    Cells not evaluated (``evaluation.every``) stay blank, with no number.
    """
    groups = [g for g in study.groups if g.model == model]
    ncols = max(len(g.runs) for g in groups)
    ntasks = max(len(g.order) for g in groups)
    fig = _new(max(7.0, 1.2 + ncols * (1.0 * ntasks + 1.6)), 0.6 + len(groups) * (1.2 + 0.45 * (ntasks + 1)))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    grid = fig.subplots(len(groups), ncols, squeeze=False)
    image = None
    for row, g in zip(grid, groups):
        tasks, rows = list(g.order), len(g.order) + 1
        for j, ax in enumerate(row):
            if j >= len(g.runs):
                ax.set_visible(False)
                continue
            run = g.runs[j]
            data = np.ma.masked_invalid(np.array(
                [[run.matrix.get(k, {}).get(t, np.nan) for t in tasks] for k in range(rows)], dtype=float))
            image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
            missing = np.ma.getmaskarray(data)
            for k in range(rows):
                for i in range(len(tasks)):
                    if not missing[k, i]:
                        v = float(data[k, i])
                        ax.text(i, k, f"{v:.2f}", ha="center", va="center", fontsize=8,
                                color="black" if v > 0.6 else "white")
            ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
            ax.set_yticks(range(rows), [g.checkpoint_label(k) for k in range(rows)])
            strategy = f"{g.strategy} · " if study.several_strategies else ""
            ax.set_title(f"{strategy}{order_text(g.order)} · seed {run.seed}")
            if j == 0:
                ax.set_ylabel("checkpoint")
    if image is not None:
        fig.colorbar(image, ax=[ax for ax in grid.flat if ax.get_visible()], label="accuracy (fraction correct)",
                     shrink=0.9)
    fig.suptitle(f"Accuracy matrices (rows: checkpoint, columns: evaluated task): {study.model_labels[model]}")
    return fig


# --------------------------------------------------------------------------- d. stability trajectories

STABILITY_PANELS = (("kl_to_base_mean", "KL to base (nats)"), ("entropy_delta_mean", "ΔEntropy vs base (nats)"),
                    ("margin_delta_mean", "ΔMargin vs base (nats, top-2 log-prob gap)"))


def stability_figure(study: Study) -> Figure:
    """KL to base, Δentropy and Δmargin on the reference set at every checkpoint (all are measured)."""
    colours = model_colours(study)
    fig = _new(13.0, 4.2 + 0.2 * math.ceil(len(study.groups) / 3))  # room for the legend below the panels
    axes = fig.subplots(1, len(STABILITY_PANELS), squeeze=False)[0]
    for ax, (key, label) in zip(axes, STABILITY_PANELS):
        values: list[float] = []
        for g in study.groups:
            steps = list(range(len(g.order) + 1))
            stats = [g.stability(k, key) for k in steps]
            values += [s.mean for s in stats if s.mean is not None]
            _errorbar(ax, steps, stats, color=colours[g.model], linestyle=LINESTYLE[g.role],
                      marker=_strategy_marker(study, g.strategy), label=_series_label(study, g))
        if key.startswith("kl"):
            _x_scale(ax, values, axis="y")
        ax.set_xlabel(STAGE_LABEL)
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_title(label.split(" (")[0])
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)))
    fig.suptitle("Drift on the reference set per checkpoint (mean ± std over seeds)")
    return fig


# --------------------------------------------------------------------------- e. training loss


def _concatenated_losses(run: Run) -> tuple[list[float], list[tuple[int, str]]]:
    """The run's optimizer-step losses, stage after stage, and where each stage starts (index, task)."""
    losses: list[float] = []
    starts: list[tuple[int, str]] = []
    for rec in run.records:
        steps = rec.train.get("steps") or []
        if rec.step == 0 or not steps:
            continue
        starts.append((len(losses), rec.checkpoint_task))
        losses += [float(s["loss"]) for s in steps]
    return losses, starts


def loss_figure(study: Study, model: str) -> Figure:
    """Training loss over the optimizer steps of all stages, a panel per (strategy, order), boundaries marked."""
    colour = model_colours(study)[model]
    groups = [g for g in study.groups if g.model == model]
    strategies = list(dict.fromkeys(g.strategy for g in groups))
    ncols = max(sum(1 for g in groups if g.strategy == s) for s in strategies)
    fig = _new(1.0 + 5.5 * ncols, 0.6 + 3.8 * len(strategies))
    grid = fig.subplots(len(strategies), ncols, squeeze=False)
    for row, strategy in zip(grid, strategies):
        mine = [g for g in groups if g.strategy == strategy]
        for j, ax in enumerate(row):
            if j >= len(mine):
                ax.set_visible(False)
                continue
            _loss_panel(ax, mine[j], colour)
            prefix = f"{strategy} · " if study.several_strategies else ""
            ax.set_title(prefix + order_text(mine[j].order))
    fig.suptitle(f"Training loss per stage: {study.model_labels[model]}")
    return fig


def _loss_panel(ax: Axes, g: OrderGroup, colour: str) -> None:
    per_seed = [_concatenated_losses(run) for run in g.runs]
    length = max((len(losses) for losses, _ in per_seed), default=0)
    if length:
        at = [[ls[i] for ls, _ in per_seed if i < len(ls)] for i in range(length)]
        mean = np.array([np.mean(v) for v in at])
        std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in at])
        x = np.arange(1, length + 1)
        ax.plot(x, mean, color=colour, marker="." if length < 60 else None, label=f"mean over {len(per_seed)} seed(s)")
        if len(per_seed) > 1:
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, label="± std over seeds")
        starts = max(per_seed, key=lambda p: len(p[0]))[1]
        for i, (start, task) in enumerate(starts):
            if i:
                ax.axvline(start + 0.5, color="grey", linestyle="--", linewidth=1)
            ax.text(start + 1, 0.98, f" {task}", transform=ax.get_xaxis_transform(), va="top", ha="left",
                    fontsize=8, color="dimgray")
        ax.legend(loc="lower left")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.text(0.5, 0.5, "no training steps recorded", transform=ax.transAxes, ha="center")
    ax.set_xlabel("optimizer step (stages concatenated; dashed: stage boundary)")
    ax.set_ylabel("training loss (cross-entropy per target token, nats)")
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------- all of them


def build_figures(study: Study, out: Path) -> list[FigureFile]:
    """Draw and save every figure of the report; figures without any data are left out."""
    files: list[FigureFile] = []

    def emit(fig: Figure, name: str, title: str, caption: str) -> None:
        files.append(save(fig, out, name, title, caption))  # saved and cleared at once: one figure at a time

    with _style():
        if not study.groups:
            return files
        if any(r.evaluated for r in study.records):
            emit(kl_accuracy_figure(study), "kl_vs_accuracy", "KL to base vs average accuracy",
                 "Each point: one checkpoint of one model and order, mean ± std over seeds; only fully evaluated "
                 "checkpoints. Pearson r (per model) over the same checkpoints per seed, base once per model.")
            emit(avg_accuracy_figure(study), "avg_accuracy_by_step", "Average accuracy per checkpoint",
                 "Average accuracy over all tasks at each checkpoint; solid: original order, dashed: reversed, "
                 "mean ± std over seeds. Checkpoints not fully evaluated are skipped (the line joins the "
                 "evaluated ones).")
        emit(stability_figure(study), "stability_trajectories", "Drift on the reference set",
             "KL to base, Δentropy and Δmargin (vs base) on the fixed reference set at every checkpoint.")
        for model in study.models:
            label = study.model_labels[model]
            emit(matrix_figure(study, model), "matrix_" + slug(label), f"Accuracy matrices: {label}",
                 "One panel per run (strategy, order and seed): rows are checkpoints, columns evaluated tasks; "
                 "a blank row: that checkpoint was not fully evaluated.")
            emit(loss_figure(study, model), "train_loss_" + slug(label), f"Training loss: {label}",
                 "Loss per optimizer step, the stages of each order one after the other (dashed: stage boundary); "
                 "mean over seeds with a ± std band.")
    return files
