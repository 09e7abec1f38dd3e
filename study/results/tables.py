"""The paper's tables rebuilt from trials: :func:`build_table` (one), :func:`report_tables` (all that apply).

A table is rows x columns of cells. Each row and column carries conditions on config columns; a cell's
trials are the counted trials meeting both (see :mod:`study.results.match` for the seeds and best-
configuration rules). Each cell holds our value (mean +- std over the seeds of the chosen configuration),
the paper's reference value from :data:`study.results.paper.PAPER` where it gives one, and their difference.

Dataset rule: every table except ``datasets`` is built for one dataset at a time (never mixing them). The
paper's numbers are VeRi-776; the difference is computed only when ours are on VeRi-776 too, otherwise
the reference column still shows the paper's numbers, labelled "VeRi-776 (paper)", and the difference
is a dash.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from reid_core.config import DATASETS, LOSSES
from study.results.paper import PAPER, Ref
from study.results.load import COUNTED, check_kind, counted
from study.results.match import add_config_column, describe, same_value, select, where_mask
from study.results.untuned import NOTE as UNTUNED_NOTE
from study.results.untuned import mark, marked

TABLE_NAMES = ("loss_comparison", "past_positives", "similarity", "backbone", "datasets", "npair_k",
               "ranked_list", "dictionary_size")
# Conditions every trial of a table meets (its "matching trials"); the rows and columns add the rest.
BASES: dict[str, Mapping[str, Any]] = {
    "loss_comparison": {},
    "past_positives": {"loss.name": "he", "framework.name": "moreid"},
    "similarity": {"framework.name": "moreid", "loss.name": ("triplet", "he")},
    "backbone": {"framework.name": "moreid", "loss.name": ("triplet", "he")},
    "datasets": {"loss.name": "he", "framework.name": "moreid"},
    "npair_k": {"loss.name": "npair"},
    "ranked_list": {"loss.name": "ranked_list"},
    "dictionary_size": {"framework.name": "moreid"},
}
SWEEPS = ("npair_k", "ranked_list", "dictionary_size")  # in a report only when 2+ swept values ran
# Row and column labels of the losses; an untuned loss carries its mark (study.results.untuned).
LOSS_LABELS = {loss: marked(label, loss)
               for loss, label in {"triplet": "Triplet", "npair": "N-pair", "ranked_list": "Ranked List",
                                   "he": "HE"}.items()}
FRAMEWORK_LABELS = {"baseline": "Baseline", "moreid": "MoReID"}
DATASET_LABELS = {"veri776": "VeRi-776", "market1501": "Market-1501", "veriwild-small": "VeRi-Wild small",
                  "veriwild-medium": "VeRi-Wild medium", "veriwild-large": "VeRi-Wild large",
                  "synthetic": "synthetic"}
YES, NO = "✓", "✗"
DASH = "—"


class TableError(ValueError):
    """An unknown table name or dataset; the message lists the known ones."""


@dataclass
class Cell:
    """One table cell. Metrics in percent; ``None`` where there is nothing (rendered as a dash)."""

    mean: float | None = None  # ours: mean over the chosen configuration's seeds
    std: float | None = None  # sample standard deviation (ddof 1), when n >= 2
    n: int = 0  # trials (seeds) behind ``mean``
    paper: float | None = None  # the paper's number
    diff: float | None = None  # mean - paper, only when both are on the paper's dataset
    note: int | None = None  # 1-based footnote number (the configuration chosen for this cell)
    derived: bool = False  # a difference of two other cells (HE gain), no seeds of its own
    values: tuple[float, ...] = ()  # the per-seed values behind ``mean``

    def ours_text(self) -> str:
        if self.mean is None:
            return DASH
        if self.derived:
            return f"{self.mean:+.2f}"
        if self.n >= 2:
            return f"{self.mean:.2f} ± {self.std:.2f} (n={self.n})"
        return f"{self.mean:.2f}"

    def paper_text(self) -> str:
        if self.paper is None:
            return DASH
        return f"{self.paper:+.1f}" if self.derived else f"{self.paper:.1f}"

    def diff_text(self) -> str:
        return DASH if self.diff is None else f"{self.diff:+.2f}"


@dataclass
class Row:
    labels: tuple[str, ...]
    key: Any  # the raw value(s) the row stands for (plots use it)
    cells: list[Cell]


@dataclass
class Table:
    """A built table; render it with :mod:`study.results.render`."""

    name: str
    title: str
    dataset: str | None  # the dataset of our numbers; None when the rows are datasets
    metric: str  # "best" or "final": which metric columns of results.csv
    row_headers: tuple[str, ...]
    columns: list[str]
    column_keys: list[Any]
    rows: list[Row]
    show_reference: bool  # False when the paper gives no number for this table
    reference_label: str
    ours_label: str
    caption: str
    notes: list[str] = field(default_factory=list)
    trials: int = 0  # counted trials matched by the table
    points: int = 0  # distinct swept values with a trial (sweep tables)

    @property
    def has_trials(self) -> bool:
        return any(cell.n > 0 for row in self.rows for cell in row.cells)

    def row(self, *labels: str) -> Row:
        """The row whose leading labels are ``labels``."""
        for row in self.rows:
            if row.labels[:len(labels)] == labels:
                return row
        raise KeyError(f"table {self.name} has no row {labels}; rows: {[r.labels for r in self.rows]}")

    def cell(self, row: str | tuple[str, ...], column: str) -> Cell:
        labels = (row,) if isinstance(row, str) else tuple(row)
        if column not in self.columns:
            raise KeyError(f"table {self.name} has no column {column!r}; columns: {self.columns}")
        return self.row(*labels).cells[self.columns.index(column)]


# ---- table specifications ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _RowSpec:
    labels: tuple[str, ...]
    key: Any
    where: Mapping[str, Any]


@dataclass(frozen=True)
class _ColSpec:
    label: str
    key: Any
    where: Mapping[str, Any]
    metric: str = "mAP"
    derived: tuple[int, int] | None = None  # (minuend, subtrahend) column indexes


@dataclass
class _Spec:
    title: str
    row_headers: tuple[str, ...]
    rows: list[_RowSpec]
    columns: list[_ColSpec]
    paper: Callable[[Any, Any], Ref | None] = lambda row, col: None
    show_reference: bool = True
    notes: list[str] = field(default_factory=list)


def _observed(trials: pd.DataFrame, key: str, ndigits: int = 6) -> list:
    values = {round(v, ndigits) if isinstance(v, float) else v for v in trials[key] if v is not None}
    return sorted(values)


def _merge(values: list, extra: list) -> list:
    out = list(values)
    for value in extra:
        if not any(same_value(value, v) for v in out):
            out.append(value)
    return sorted(out)


def _yes(flag: bool) -> str:
    return YES if flag else NO


def _loss_comparison(trials: pd.DataFrame) -> _Spec:
    rows = [_RowSpec((LOSS_LABELS[loss], FRAMEWORK_LABELS[fw]), (loss, fw),
                     {"loss.name": loss, "framework.name": fw})
            for loss in LOSSES for fw in FRAMEWORK_LABELS]
    return _Spec(
        title="Loss x framework (main paper): mAP and R1, %", row_headers=("Loss", "Framework"), rows=rows,
        columns=[_ColSpec("mAP", "mAP", {}, "mAP"), _ColSpec("R1", "R1", {}, "R1")],
        notes=[f"Reference: {PAPER.missing['loss_comparison']}.",
               f"The paper uses N-pair with {describe(PAPER.npair_optimum.params)} and Ranked List with "
               f"{describe(PAPER.ranked_list_optimum.params)} ({PAPER.npair_optimum.source}).", UNTUNED_NOTE])


def _past_positives(trials: pd.DataFrame) -> _Spec:
    momenta = _merge(_observed(trials, "framework.momentum"), [m for m, _ in PAPER.past_positives])
    return _Spec(
        title="Past positives (supplementary C): HE loss, MoReID, mAP %",
        row_headers=("w/ past positives",),
        rows=[_RowSpec((YES,), True, {"framework.include_past_positives": True}),
              _RowSpec((f"{NO} (paper's method)",), False, {"framework.include_past_positives": False})],
        columns=[_ColSpec(f"m = {m:g}", m, {"framework.momentum": m}) for m in momenta],
        paper=lambda include, m: _lookup(PAPER.past_positives, lambda k: same_value(k[0], m) and k[1] is include))


def _similarity(trials: pd.DataFrame) -> _Spec:
    rows = []
    for loss, distance in PAPER.similarity:
        where = {"loss.name": loss} if distance is None else {"loss.name": loss, "loss.distance": distance}
        rows.append(_RowSpec((LOSS_LABELS[loss], distance or "any"), (loss, distance), where))
    return _Spec(
        title="Similarity measure (supplementary D): MoReID, mAP %",
        row_headers=("Loss", "Distance"), rows=rows, columns=[_ColSpec("mAP", "mAP", {})],
        paper=lambda row, col: PAPER.similarity.get(row),
        notes=["The paper does not state the triplet loss's distance: that row takes any."])


def _backbone(trials: pd.DataFrame) -> _Spec:
    combos = list(dict.fromkeys(key[:3] for key in PAPER.backbone))
    for combo in zip(trials["data.autoaug"], trials["model.ibn"], trials["model.non_local"]):
        if None not in combo and combo not in combos:
            combos.append(combo)
    rows = [_RowSpec(tuple(_yes(flag) for flag in combo), combo,
                     {"data.autoaug": combo[0], "model.ibn": combo[1], "model.non_local": combo[2]})
            for combo in combos]

    def paper(combo: tuple, loss: str) -> Ref | None:
        if loss == "gain":
            he, triplet = PAPER.backbone.get((*combo, "he")), PAPER.backbone.get((*combo, "triplet"))
            if he is None or triplet is None:
                return None
            return Ref(round(he.value - triplet.value, 1), he.source)
        return PAPER.backbone.get((*combo, loss))

    return _Spec(
        title="Backbone components (supplementary E): MoReID, mAP %",
        row_headers=("AutoAug", "IBN", "non-local"), rows=rows,
        columns=[_ColSpec("Triplet", "triplet", {"loss.name": "triplet"}),
                 _ColSpec("HE", "he", {"loss.name": "he"}),
                 _ColSpec("HE gain", "gain", {}, derived=(1, 0))],
        paper=paper)


def _datasets(trials: pd.DataFrame) -> _Spec:
    names = ["veri776", "market1501", "veriwild-small", "veriwild-medium", "veriwild-large"]
    names += [d for d in _observed(trials, "data.dataset") if d not in names]
    return _Spec(
        title="Datasets (main paper): HE loss, MoReID, %",
        row_headers=("Dataset",),
        rows=[_RowSpec((DATASET_LABELS.get(d, d),), d, {"data.dataset": d}) for d in names],
        columns=[_ColSpec(m, m, {}, m) for m in ("mAP", "R1", "R5", "mINP")],
        notes=[f"Reference: {PAPER.missing['datasets']}."])


def _npair_k(trials: pd.DataFrame) -> _Spec:
    best_k = PAPER.npair_optimum.params["loss.k"]
    ks = _merge(_observed(trials, "loss.k"), [best_k])
    return _Spec(
        title="N-pair loss: mAP against k, %", row_headers=("k",),
        rows=[_RowSpec((f"{k} (paper's optimum)" if k == best_k else str(k),), k, {"loss.k": k}) for k in ks],
        columns=[_ColSpec(label, fw, {"framework.name": fw}) for fw, label in FRAMEWORK_LABELS.items()],
        show_reference=False,
        notes=[f"The paper reports only the optimum, k = {best_k} in both frameworks "
               f"({PAPER.npair_optimum.source}), no mAP per k."])


def _ranked_list(trials: pd.DataFrame) -> _Spec:
    opt = PAPER.ranked_list_optimum.params
    alphas = _merge(_observed(trials, "loss.alpha"), [opt["loss.alpha"]])
    betas = _merge(_observed(trials, "loss.beta"), [opt["loss.beta"]])
    frameworks = [fw for fw in FRAMEWORK_LABELS if fw in set(trials["framework.name"])] or list(FRAMEWORK_LABELS)
    return _Spec(
        title="Ranked List loss: mAP over alpha x beta, %", row_headers=("Framework", "α"),
        rows=[_RowSpec((FRAMEWORK_LABELS[fw], f"{a:g}"), (fw, a), {"framework.name": fw, "loss.alpha": a})
              for fw in frameworks for a in alphas],
        columns=[_ColSpec(f"β = {b:g}", b, {"loss.beta": b}) for b in betas],
        show_reference=False,
        notes=[f"The paper reports only the optimum, α = {opt['loss.alpha']:g}, β = {opt['loss.beta']:g} in "
               f"both frameworks ({PAPER.ranked_list_optimum.source}), no mAP per cell. "
               "Cells with β ≥ α cannot run (the config rejects them).",
               "The cells are read on the test split: our best cell is not a choice on a validation split, and the "
               "other tables keep Ranked List marked untuned."])


def _dictionary_size(trials: pd.DataFrame) -> _Spec:
    losses = [loss for loss in LOSSES if loss in set(trials["loss.name"])] or ["he"]
    sizes = _observed(trials, "framework.dict_size")
    return _Spec(
        title="MoReID: mAP against dictionary size, %", row_headers=("Dictionary size",),
        rows=[_RowSpec((str(s),), s, {"framework.dict_size": s}) for s in sizes],
        columns=[_ColSpec(LOSS_LABELS[loss], loss, {"loss.name": loss}) for loss in losses],
        show_reference=False, notes=["The supplementary gives no number for this sweep."]
        + ([UNTUNED_NOTE] if any(mark(loss) for loss in losses) else []))


_BUILDERS: dict[str, Callable[[pd.DataFrame], _Spec]] = {
    "loss_comparison": _loss_comparison, "past_positives": _past_positives, "similarity": _similarity,
    "backbone": _backbone, "datasets": _datasets, "npair_k": _npair_k, "ranked_list": _ranked_list,
    "dictionary_size": _dictionary_size,
}



def _lookup(refs: Mapping[Any, Ref], test: Callable[[Any], bool]) -> Ref | None:
    return next((ref for key, ref in refs.items() if test(key)), None)


# ---- building ------------------------------------------------------------------------------------------

def check_name(name: str) -> None:
    if name not in TABLE_NAMES:
        raise TableError(f"unknown table {name!r}; known tables: {', '.join(TABLE_NAMES)}")


def table_datasets(name: str, frame: pd.DataFrame, metric: str = "best") -> list[str | None]:
    """The datasets a table is built for: those of its counted trials, VeRi-776 first.

    With no counted trial: those of its other trials, else the paper's dataset. ``[None]`` for the
    ``datasets`` table, whose rows are the datasets.
    """
    check_name(name)
    if name == "datasets":
        return [None]
    kind = metric
    frame = _prepared(frame)
    matched = frame[where_mask(frame, BASES[name])]
    found = set(counted(matched, kind)["data.dataset"]) or set(matched["data.dataset"])
    found.discard(None)
    order = [PAPER.dataset] + [d for d in DATASETS if d != PAPER.dataset]
    return sorted(found, key=lambda d: (order.index(d) if d in order else len(order), d)) or [PAPER.dataset]


def build_table(name: str, frame: pd.DataFrame, *, dataset: str | None = None, metric: str = "best") -> Table:
    """Table ``name`` from the trials in ``frame`` (as :func:`study.results.load.load_results` gives).

    ``dataset``: the dataset of our numbers (ignored by ``datasets``); by default the first of
    :func:`table_datasets`. ``metric``: ``best`` (each trial's best evaluation, the ``best_*`` columns)
    or ``final`` (its last, ``final_*``).
    """
    kind = metric
    check_name(name)
    check_kind(kind)
    frame = _prepared(frame)
    if name == "datasets":
        dataset = None
    elif dataset is None:
        dataset = table_datasets(name, frame, kind)[0]
    elif dataset not in DATASETS:
        raise TableError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    scope = frame if dataset is None else frame[where_mask(frame, {"data.dataset": dataset})]
    spec_trials = scope[where_mask(scope, BASES[name])]
    spec = _BUILDERS[name](spec_trials)
    usable = counted(spec_trials, kind)
    comparable = dataset == PAPER.dataset
    data_label = DATASET_LABELS.get(dataset, dataset) if dataset else ""
    table = Table(
        name=name, title=spec.title + (f" (ours on {data_label})" if dataset else ""), dataset=dataset,
        metric=kind, row_headers=spec.row_headers, columns=[c.label for c in spec.columns],
        column_keys=[c.key for c in spec.columns], rows=[], show_reference=spec.show_reference,
        reference_label=f"{PAPER.dataset_label} (paper)" if dataset else "paper",
        ours_label=f"ours ({data_label})" if dataset else "ours",
        caption=_caption(spec, kind, dataset, comparable), trials=len(usable))
    notes_by_selection: dict[tuple, int] = {}  # one footnote per (row, column conditions) selection
    for row in spec.rows:
        cells: list[Cell] = []
        for col in spec.columns:
            ref = spec.paper(row.key, col.key)
            cell = Cell(paper=None if ref is None else ref.value, derived=col.derived is not None)
            if not cell.derived:
                _fill(cell, usable, row, col, kind, table.notes, notes_by_selection)
            cells.append(cell)
        for index, col in enumerate(spec.columns):
            if col.derived:
                a, b = (cells[i].mean for i in col.derived)
                cells[index].mean = None if a is None or b is None else a - b
        if comparable:
            for cell in cells:
                if cell.mean is not None and cell.paper is not None:
                    cell.diff = cell.mean - cell.paper
        table.rows.append(Row(labels=row.labels, key=row.key, cells=cells))
    table.notes.extend(spec.notes)
    table.notes.extend(_uncounted_note(spec_trials, kind))
    table.notes.extend(_best_notes(name, table))
    table.points = _points(name, table)
    return table


def _fill(cell: Cell, usable: pd.DataFrame, row: _RowSpec, col: _ColSpec, kind: str, notes: list[str],
          notes_by_selection: dict[tuple, int]) -> None:
    """Our value of one cell: the seeds of the best configuration among the trials meeting row and column."""
    selection = select(usable[where_mask(usable, {**row.where, **col.where})], kind)
    if selection is None:
        return
    values = selection.values(f"{kind}_{col.metric}")
    if len(values):
        cell.values = tuple(float(v) for v in values)
        cell.n = len(values)
        cell.mean = float(np.mean(values))
        cell.std = float(np.std(values, ddof=1)) if len(values) >= 2 else None
    if selection.n_configs > 1:
        marker = (row.labels, tuple(sorted(col.where.items())))
        if marker not in notes_by_selection:
            label = " / ".join(row.labels + ((col.label,) if col.where else ()))
            notes.append(f"{label}: best of {selection.n_configs} configurations by mean {kind}_mAP: "
                         f"{describe(selection.differing)}.")
            notes_by_selection[marker] = len(notes)
        cell.note = notes_by_selection[marker]


def build_tables(name: str, frame: pd.DataFrame, *, metric: str = "best") -> list[Table]:
    """Table ``name`` once per dataset of :func:`table_datasets`."""
    frame = _prepared(frame)
    return [build_table(name, frame, dataset=d, metric=metric) for d in table_datasets(name, frame, metric)]


def applies(table: Table) -> bool:
    """Whether a report shows the table: a trial in some cell, and for a sweep two swept values or more."""
    return table.has_trials and (table.name not in SWEEPS or table.points >= 2)


def report_tables(frame: pd.DataFrame, *, metric: str = "best") -> list[Table]:
    """Every table that applies, in :data:`TABLE_NAMES` order, one per dataset."""
    frame = _prepared(frame)
    return [t for name in TABLE_NAMES for t in build_tables(name, frame, metric=metric) if applies(t)]


def _prepared(frame: pd.DataFrame) -> pd.DataFrame:
    return frame if "_config" in frame.columns else add_config_column(frame)


def _caption(spec: _Spec, kind: str, dataset: str | None, comparable: bool) -> str:
    which = "best evaluation (best_*)" if kind == "best" else "last evaluation (final_*)"
    parts = [f"Ours: each trial's {which}, mean ± std over seeds (n trials) of the cell's configuration."]
    if spec.show_reference:
        if dataset is None:
            parts.append("Reference: the paper, on the row's dataset. Δ = ours − paper.")
        elif comparable:
            parts.append(f"Reference: {PAPER.dataset_label} (paper). Δ = ours − paper.")
        else:
            label = DATASET_LABELS.get(dataset, dataset)
            parts.append(f"Reference: the paper's numbers on {PAPER.dataset_label}; ours are on {label}, "
                         "so Δ is not computed.")
    return " ".join(parts)


def _uncounted_note(trials: pd.DataFrame, kind: str) -> list[str]:
    left = trials[~trials.index.isin(counted(trials, kind).index)]
    if left.empty:
        return []
    parts = []
    for status, count in left["status"].value_counts().sort_index().items():
        reason = "" if status not in COUNTED else f" without {kind}_mAP"
        parts.append(f"{count} {status}{reason}")
    return [f"Not counted: {', '.join(parts)} trial(s) matching this table."]


def _best_notes(name: str, table: Table) -> list[str]:
    """Our optimum of a sweep, per column (npair_k) or per framework (ranked_list)."""
    found: list[str] = []
    if name == "npair_k":
        for index, label in enumerate(table.columns):
            best = max(((row.cells[index].mean, row.key) for row in table.rows if row.cells[index].mean is not None),
                       default=None, key=lambda item: item[0])
            if best:
                found.append(f"{label}: k = {best[1]} (mAP {best[0]:.2f})")
    elif name == "ranked_list":
        for fw, label in FRAMEWORK_LABELS.items():
            best = max(((cell.mean, row.key[1], table.column_keys[i]) for row in table.rows if row.key[0] == fw
                        for i, cell in enumerate(row.cells) if cell.mean is not None),
                       default=None, key=lambda item: item[0])
            if best:
                found.append(f"{label}: α = {best[1]:g}, β = {best[2]:g} (mAP {best[0]:.2f})")
    return [f"Our optimum: {'; '.join(found)}."] if found else []


def _points(name: str, table: Table) -> int:
    if name == "ranked_list":
        return len({(row.key[1], table.column_keys[i]) for row in table.rows
                    for i, cell in enumerate(row.cells) if cell.n})
    return sum(1 for row in table.rows if any(cell.n for cell in row.cells))
