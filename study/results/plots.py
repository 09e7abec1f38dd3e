"""PNG plots of the built tables and of the best trials' CMC curves.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend switch), so
it is safe inside Ray workers and threads. Every function returns the path it wrote.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from study.results.paper import PAPER
from study.results.load import counted
from study.results.match import add_config_column
from study.results.tables import DATASET_LABELS, Table
from study.results.untuned import mark, marked

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
PLOTTED = ("past_positives", "ranked_list", "npair_k", "dictionary_size")
SYNTHETIC = "synthetic"
CMC_CURVES = 6  # configurations drawn in the CMC plot, best first


def write_plots(tables: Sequence[Table], frame: pd.DataFrame, out_dir: str | Path, *,
                metric: str = "best") -> list[Path]:
    """Every plot that ``tables`` (and the trials' CMC curves) allow, into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = {"past_positives": plot_past_positives, "ranked_list": plot_ranked_list,
               "npair_k": plot_npair_k, "dictionary_size": plot_dictionary_size}
    written: list[Path] = []
    for table in tables:
        # The ablation plots draw our numbers beside the paper's: trials on synthetic data (the demo) are
        # not comparable and stay in results.md's tables only.
        if table.name not in drawers or not table.has_trials or table.dataset == SYNTHETIC:
            continue
        several = sum(t.name == table.name for t in tables) > 1
        stem = f"{table.name}_{table.dataset}" if several and table.dataset else table.name
        written.append(drawers[table.name](table, out_dir / f"{stem}.png"))
    cmc = plot_cmc(frame, out_dir / "cmc.png", metric=metric)
    if cmc is not None:
        written.append(cmc)
    return written


def plot_past_positives(table: Table, path: Path) -> Path:
    """mAP against m, with and without past positives; ours with seed error bars, the paper's hollow."""
    fig, ax = _figure()
    ms = np.array(table.column_keys, dtype=float)
    for color, row in zip(_COLORS, table.rows):
        name = "with past positives" if row.key else "without (paper's method)"
        _errorbar_line(ax, ms, row.cells, color, f"{name}: {table.ours_label}")
        paper = [(m, c.paper) for m, c in zip(ms, row.cells) if c.paper is not None]
        if paper:
            x, y = zip(*paper)
            ax.plot(x, y, linestyle=":", marker="o", markerfacecolor="none", markersize=8, color=color,
                    label=f"{name}: {table.reference_label}")
    ax.set_xticks(ms, [f"{m:g}" for m in ms])
    ax.set_xlabel("momentum m")
    return _finish(fig, ax, path, f"Past positives (HE, MoReID){_on(table)}", "mAP (%)")


def _line_per_column(ax, table: Table) -> np.ndarray:
    """One error-bar line per table column against the numeric row keys; returns those keys."""
    xs = np.array([float(row.key) for row in table.rows])
    for index, (color, label) in enumerate(zip(_COLORS, table.columns)):
        _errorbar_line(ax, xs, [row.cells[index] for row in table.rows], color, label)
    return xs


def plot_npair_k(table: Table, path: Path) -> Path:
    """mAP against k, one line per framework; the paper's optimum as a dashed vertical line."""
    fig, ax = _figure()
    ks = _line_per_column(ax, table)
    best_k = PAPER.npair_optimum.params["loss.k"]
    ax.axvline(best_k, color="0.4", linestyle="--", linewidth=1, label=f"paper's optimum k = {best_k}")
    ax.set_xticks(ks, [f"{k:g}" for k in ks])
    ax.set_xlabel("k (hard negatives)")
    return _finish(fig, ax, path, f"N-pair loss: mAP against k{_on(table)}", "mAP (%)")


def plot_dictionary_size(table: Table, path: Path) -> Path:
    """mAP against the dictionary size S (log2 axis), one line per loss."""
    fig, ax = _figure()
    sizes = _line_per_column(ax, table)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{int(s)}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("dictionary size S (keys)")
    return _finish(fig, ax, path, f"MoReID: mAP against dictionary size{_on(table)}", "mAP (%)")


def plot_ranked_list(table: Table, path: Path) -> Path:
    """alpha x beta heat map of mean mAP, one panel per framework; empty cells blank, paper's optimum boxed."""
    frameworks = list(dict.fromkeys(row.key[0] for row in table.rows))
    alphas = sorted({row.key[1] for row in table.rows})
    betas = list(table.column_keys)
    grids = {fw: np.full((len(alphas), len(betas)), np.nan) for fw in frameworks}
    for row in table.rows:
        for j, cell in enumerate(row.cells):
            if cell.mean is not None:
                grids[row.key[0]][alphas.index(row.key[1]), j] = cell.mean
    values = np.concatenate([g.ravel() for g in grids.values()])
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    fig = Figure(figsize=(1.2 + 0.9 * len(betas) * len(frameworks) + 1.0, 1.6 + 0.6 * len(alphas)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(frameworks), squeeze=False)[0]
    cmap = _cmap()
    opt = PAPER.ranked_list_optimum.params
    image = None
    for ax, fw in zip(axes, frameworks):
        grid = grids[fw]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=low, vmax=high, origin="lower",
                          aspect="auto")
        for i in range(len(alphas)):
            for j in range(len(betas)):
                v = grid[i, j]
                if math.isfinite(v):
                    dark = (v - low) / (high - low) < 0.6
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
                else:
                    ax.text(j, i, "no trial", ha="center", va="center", fontsize=7, color="0.6")
        if opt["loss.alpha"] in alphas and any(abs(b - opt["loss.beta"]) < 1e-6 for b in betas):
            i = alphas.index(opt["loss.alpha"])
            j = next(j for j, b in enumerate(betas) if abs(b - opt["loss.beta"]) < 1e-6)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2,
                                   linestyle="--"))
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("β (margin)")
        ax.set_ylabel("α")
        ax.set_title(fw if fw not in ("baseline", "moreid") else {"baseline": "Baseline", "moreid": "MoReID"}[fw])
    fig.colorbar(image, ax=list(axes), label="mAP (%)")
    fig.suptitle(f"Ranked List loss: mAP over α × β{_on(table)}\n(red dashed box: the paper's optimum, "
                 f"α = {opt['loss.alpha']:g}, β = {opt['loss.beta']:g})", fontsize=9)
    return _save(fig, path)


def plot_cmc(frame: pd.DataFrame, path: Path, *, metric: str = "best") -> Path | None:
    """CMC curves (ranks 1..20, best evaluation) of the best configurations, one panel per dataset.

    For each configuration the seed with the highest ``<metric>_mAP`` is drawn; the :data:`CMC_CURVES`
    best configurations by mean mAP are kept. None (nothing written) when no trial has a CMC. The
    ``cmc`` column always holds the best evaluation's curve.
    """
    kind = metric
    if "_config" not in frame.columns:
        frame = add_config_column(frame)
    trials = counted(frame, kind)
    trials = trials[trials["cmc"].map(lambda text: _cmc(text) is not None)] if "cmc" in trials else trials[:0]
    if trials.empty:
        return None
    datasets = sorted(set(trials["data.dataset"]), key=str)
    score = f"{kind}_mAP"
    panels = []
    for dataset in datasets:
        subset = trials[trials["data.dataset"] == dataset]
        ranked = sorted(subset.groupby(subset["_config"].map(repr)), key=lambda g: -g[1][score].mean())
        chosen = [rows.loc[rows[score].idxmax()] for _, rows in ranked[:CMC_CURVES]]
        panels.append((dataset, chosen, _labels([dict(row["_config"]) for row in chosen])))
    # The legend sits under the axes: the figure grows with its lines, or the axes would be squeezed away.
    legend_lines = max(sum(label.count("\n") + 1 for label in labels) for _, _, labels in panels)
    fig = Figure(figsize=(6.4 * len(datasets), 4.4 + 0.16 * legend_lines), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, (dataset, chosen, labels) in zip(axes, panels):
        for color, row, label in zip(_COLORS, chosen, labels):
            curve = _cmc(row["cmc"])
            ranks = np.arange(1, len(curve) + 1)
            ax.plot(ranks, curve, marker=".", color=color, label=f"{label} (mAP {row[score]:.1f})")
        ax.set_xlabel("rank")
        ax.set_ylabel("CMC (%)")
        ax.set_xlim(0.5, max(len(_cmc(row["cmc"])) for row in chosen) + 0.5)
        ax.set_ylim(top=100)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
        ax.set_title(f"CMC of the best configurations: {DATASET_LABELS.get(dataset, dataset)}", fontsize=10)
    return _save(fig, path)


# How a legend shows a value of the "name" keys (the framework and the loss read as one name: "MoReID + HE").
VALUE_NAMES = {"baseline": "Baseline", "moreid": "MoReID", "he": "HE", "triplet": "triplet", "npair": "N-pair",
               "ranked_list": "Ranked List"}
NAME_KEYS = ("framework.name", "loss.name")
LABEL_WIDTH = 60  # characters per legend line; longer labels wrap


def _labels(configs: list[dict]) -> list[str]:
    """Legend labels naming what differs between the plotted configurations: the framework and loss by
    name (``MoReID + HE``), every other key as ``key=value`` under its last dotted part, or its whole
    dotted name where two keys share that part (``optim.lr=0.001, data.height=64``). Keys on which the
    configurations agree are left out."""
    # A key is shown when the configurations that have it disagree on it; one that only some have, with
    # one value (a loss's own knob at its default, say), is implied by the framework and loss names.
    every = list(dict.fromkeys(k for c in configs for k in c))
    keys = [k for k in every if len({str(c[k]) for c in configs if k in c}) > 1]
    if not keys:
        keys = list(NAME_KEYS)
    named = [k for k in NAME_KEYS if k in keys]
    others = [k for k in keys if k not in NAME_KEYS]
    tails = [k.rsplit(".", 1)[-1] for k in others]
    short = {k: (t if tails.count(t) == 1 else k) for k, t in zip(others, tails)}
    out = []
    for config in configs:
        parts = []
        names = [_value_name(config[k]) for k in named if k in config]
        if "loss.name" in named and mark(config.get("loss.name")):
            names[-1] = marked(names[-1], config["loss.name"])  # an untuned loss says so (study.results.untuned)
        if names:
            parts.append(" + ".join(names))
        parts.extend(f"{short[k]}={_value_text(config[k])}" for k in others if k in config)
        out.append(_wrap(", ".join(parts)))
    return out


def _value_name(value: object) -> str:
    return VALUE_NAMES.get(str(value), str(value))


def _value_text(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _wrap(text: str) -> str:
    """Break a long label at ", " so that no line exceeds :data:`LABEL_WIDTH` characters (if it can)."""
    lines: list[str] = []
    for part in text.split(", "):
        if lines and len(lines[-1]) + 2 + len(part) <= LABEL_WIDTH:
            lines[-1] += ", " + part
        else:
            lines.append(part)
    return ",\n".join(lines)


def _cmc(text: object) -> list[float] | None:
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        curve = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(curve, list) or not curve or not all(isinstance(v, (int, float)) for v in curve):
        return None
    return [float(v) for v in curve]


def _errorbar_line(ax, x: np.ndarray, cells, color: str, label: str) -> None:
    points = [(xi, c.mean, c.std or 0.0) for xi, c in zip(x, cells) if c.mean is not None]
    if not points:
        return
    xs, ys, es = zip(*points)
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, color=color, label=label)


def _on(table: Table) -> str:
    return f", ours on {DATASET_LABELS.get(table.dataset, table.dataset)}" if table.dataset else ""


def _figure():
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig: Figure, ax, path: Path, title: str, ylabel: str) -> Path:
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _cmap():
    return colormaps["viridis"].with_extremes(bad="white")
