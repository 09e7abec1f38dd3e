"""The ``directions`` table: does each of the paper's claims (A beats B) hold in our trials?

A claim compares two cells of trials (its *better* and *worse* sides, each a set of conditions on config
columns, matched as every other table matches its cells: :func:`study.results.match.select`). Per claim:
the paper's table and cells, the paper's difference (from :data:`study.results.paper.PAPER`; none where the
number is in the main text, which is not in our hands), ours as mean ± std over seeds on each side, our
difference with a 95 % Welch interval, and a verdict:

- ``reproduced``: the interval lies above 0 (the claimed side is better);
- ``contradicted``: the interval lies below 0 (the other side is better);
- ``inconclusive``: the interval holds 0, or a side has fewer than 2 seeds (no interval).

The interval and the p-value are Welch's (SciPy's ``ttest_ind(equal_var=False)`` and its
``confidence_interval``); the per-claim verdict is that test at 0.05 read alone. A table reads several
claims at once, so each claim also gets Holm's step-down correction over the table's tested claims
(family-wise error 0.05): ``verdict_holm`` is reproduced / contradicted only when the Holm-adjusted p-value
is at most 0.05, the sign of the difference saying which. Claims with an untuned side (Ranked List:
:mod:`study.results.untuned`) carry the mark in the side's label and a note.

A claim appears when both of its sides have at least one counted trial. Differences are of absolute
metrics (percent points), so they compare across datasets in sign, not in size.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from study.results.paper import PAPER, Ref
from study.results.load import check_kind, counted
from study.results.match import add_config_column, describe, select, where_mask
from study.results.render import _md_row, _num
from study.results.tables import DASH, DATASET_LABELS
from study.results.untuned import NOTE as UNTUNED_NOTE
from study.results.untuned import marked, where_mark

NAME = "directions"
VERDICTS = ("reproduced", "contradicted", "inconclusive")
CONFIDENCE = 0.95
FAMILY_ALPHA = 1 - CONFIDENCE  # Holm: family-wise error rate over the claims of one table
DIRECTIONS_CSV_COLUMNS = ("claim", "dataset", "paper_source", "paper_cells", "paper_diff", "better", "better_mean",
               "better_std", "better_n", "worse", "worse_mean", "worse_std", "worse_n", "diff", "ci_low",
               "ci_high", "verdict", "p_value", "p_holm", "verdict_holm", "note")

_MOREID = {"framework.name": "moreid", "framework.include_past_positives": False}
_BASELINE = {"framework.name": "baseline"}
_HE_EUCLID = {"loss.name": "he", "loss.distance": "euclidean"}
_MAIN_TEXT = "main paper (not in our hands)"


# ---- claims --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Side:
    """One side of a claim: a label and the conditions its trials meet."""

    label: str
    where: Mapping[str, Any]


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse``; ``paper_diff`` (percent points) is None where the paper's number is not
    in our hands. ``at_least``: the paper claims only "at least as good"."""

    name: str
    better: Side
    worse: Side
    paper_source: str
    paper_cells: str
    paper_diff: float | None
    at_least: bool = False


def _gap(better: Ref, worse: Ref) -> float:
    return round(better.value - worse.value, 1)


def _loss_claims() -> list[Claim]:
    he_tri = (PAPER.similarity[("he", "euclidean")], PAPER.similarity[("triplet", None)])
    claims = [
        Claim("HE beats Triplet (MoReID)", Side("MoReID HE", {**_MOREID, **_HE_EUCLID}),
              Side("MoReID Triplet", {**_MOREID, "loss.name": "triplet"}), he_tri[0].source,
              f"HE euclidean {he_tri[0].value:g} vs Triplet {he_tri[1].value:g}", _gap(*he_tri)),
        Claim("HE beats Triplet (baseline)", Side("baseline HE", {**_BASELINE, **_HE_EUCLID}),
              Side("baseline Triplet", {**_BASELINE, "loss.name": "triplet"}), _MAIN_TEXT, "loss x framework",
              None),
        Claim("MoReID beats baseline (HE)", Side("MoReID HE", {**_MOREID, **_HE_EUCLID}),
              Side("baseline HE", {**_BASELINE, **_HE_EUCLID}), _MAIN_TEXT, "loss x framework", None),
    ]
    for loss, label in (("npair", "N-pair"), ("ranked_list", "Ranked List")):
        for fw, fw_label, where in (("moreid", "MoReID", _MOREID), ("baseline", "baseline", _BASELINE)):
            claims.append(Claim(f"HE beats {label} ({fw_label})", Side(f"{fw_label} HE", {**where, **_HE_EUCLID}),
                                Side(f"{fw_label} {label}", {**where, "loss.name": loss}), _MAIN_TEXT,
                                "loss x framework", None))
    return claims


def _past_positive_claims(trials: pd.DataFrame) -> list[Claim]:
    """One claim per momentum our trials ran with past positives; the paper's cells at that m, or at the
    nearest m the paper reports (named in the cells text)."""
    with_past = trials[where_mask(trials, {"framework.name": "moreid", "loss.name": "he",
                                           "framework.include_past_positives": True})]
    momenta = sorted({round(float(m), 6) for m in with_past["framework.momentum"] if m is not None})
    paper_momenta = sorted({m for m, _ in PAPER.past_positives})
    claims = []
    for m in momenta:
        nearest = min(paper_momenta, key=lambda p: (abs(p - m), p))
        without, past = PAPER.past_positives[(nearest, False)], PAPER.past_positives[(nearest, True)]
        where = f"m = {nearest:g}" + ("" if math.isclose(nearest, m) else f", the paper's nearest to our {m:g}")
        base = {"framework.name": "moreid", "framework.momentum": m, **_HE_EUCLID}
        claims.append(Claim(
            f"Negatives only beats with past positives (HE, MoReID, m = {m:g})",
            Side("negatives only", {**base, "framework.include_past_positives": False}),
            Side("with past positives", {**base, "framework.include_past_positives": True}),
            without.source, f"w/o {without.value:g} vs with {past.value:g} at {where}", _gap(without, past)))
    return claims


def _similarity_claim() -> Claim:
    euclid, cosine = PAPER.similarity[("he", "euclidean")], PAPER.similarity[("he", "cosine")]
    return Claim("Euclidean at least as good as cosine (HE, MoReID)", Side("HE euclidean", {**_MOREID, **_HE_EUCLID}),
                 Side("HE cosine", {**_MOREID, "loss.name": "he", "loss.distance": "cosine"}), euclid.source,
                 f"HE euclidean {euclid.value:g} vs cosine {cosine.value:g}", _gap(euclid, cosine), at_least=True)


def claims_for(trials: pd.DataFrame) -> list[Claim]:
    """Every claim the directions table knows, in report order (past-positive claims per momentum run)."""
    loss = _loss_claims()
    return loss[:3] + _past_positive_claims(trials) + [_similarity_claim()] + loss[3:]


# ---- statistics ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Welch:
    """Welch's two-sided test of mean(a) = mean(b) and the ``confidence`` interval of mean(a) − mean(b)
    (unequal variances; SciPy's ``ttest_ind(equal_var=False)``), in the units of the values."""

    diff: float
    low: float
    high: float
    p_value: float
    df: float

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Welch:
    """Welch's test and interval of mean(a) − mean(b); both sides need 2+ values.

    Both sides without spread (every value equal within its side) have no standard error: the interval is
    the difference itself and the p-value 0 when the means differ, 1 when they are equal (SciPy returns
    NaN there)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's interval needs at least 2 values per side; got {len(a)} and {len(b)}")
    diff = float(a.mean() - b.mean())
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return Welch(diff, diff, diff, 0.0 if diff != 0 else 1.0, math.inf)
    result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(confidence)
    return Welch(diff, float(interval.low), float(interval.high), float(result.pvalue), float(result.df))


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Welch's ``confidence`` interval of mean(a) − mean(b) (unequal variances); both need 2+ values."""
    return welch(a, b, confidence).interval


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of m p-values is multiplied
    by m − i + 1, and each adjusted value is the running maximum of those (capped at 1). A hypothesis is
    rejected at family-wise level alpha exactly when its adjusted p-value is at most alpha."""
    p = np.asarray(p_values, dtype=float)
    if np.any((p < 0) | (p > 1) | np.isnan(p)):
        raise ValueError(f"p-values must lie in [0, 1]; got {list(p_values)}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [float(v) for v in adjusted]


def verdict(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return "inconclusive"
    low, high = interval
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "inconclusive"


def holm_verdict(diff: float | None, p_holm: float | None, alpha: float = FAMILY_ALPHA) -> str:
    """Reproduced / contradicted when the Holm-adjusted p-value is at most ``alpha`` (the sign of the
    difference says which), inconclusive otherwise or without a test."""
    if diff is None or p_holm is None or p_holm > alpha or diff == 0:
        return "inconclusive"
    return "reproduced" if diff > 0 else "contradicted"


# ---- the table -----------------------------------------------------------------------------------------

@dataclass
class SideResult:
    label: str
    values: tuple[float, ...] = ()
    configs: int = 0  # configurations the side's cell held (the best one is reported)
    chosen: str = ""  # the chosen configuration's differing keys, when several

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else None

    def text(self) -> str:
        if not self.values:
            return DASH
        if self.n == 1:
            return f"{self.mean:.2f} (n=1)"
        return f"{self.mean:.2f} ± {self.std:.2f} (n={self.n})"


@dataclass
class Direction:
    claim: Claim
    better: SideResult
    worse: SideResult
    interval: tuple[float, float] | None
    verdict: str
    notes: tuple[str, ...] = ()
    p_value: float | None = None  # Welch's two-sided test; None without an interval
    p_holm: float | None = None  # Holm-adjusted over the table's claims that have a p-value
    verdict_holm: str = "inconclusive"

    @property
    def note(self) -> str:
        return "; ".join(self.notes)

    @property
    def diff(self) -> float | None:
        if self.better.mean is None or self.worse.mean is None:
            return None
        return self.better.mean - self.worse.mean


@dataclass
class DirectionsTable:
    dataset: str | None
    metric: str  # best | final
    rows: list[Direction] = field(default_factory=list)

    @property
    def title(self) -> str:
        label = DATASET_LABELS.get(self.dataset, self.dataset) if self.dataset else "all datasets"
        return f"Directions: the paper's claims in our trials (ours on {label})"


def _side(trials: pd.DataFrame, side: Side, kind: str) -> SideResult:
    label = marked(side.label, side.where.get("loss.name"))
    selection = select(trials[where_mask(trials, side.where)], kind)
    if selection is None:
        return SideResult(label)
    chosen = describe(selection.differing) if selection.n_configs > 1 else ""
    return SideResult(label, tuple(float(v) for v in selection.values(f"{kind}_mAP")), selection.n_configs,
                      chosen)


def build_directions(frame: pd.DataFrame, *, metric: str = "best") -> list[DirectionsTable]:
    """One directions table per dataset holding trials (VeRi-776 first), each with the claims whose two
    sides have a counted trial. ``metric``: ``best`` or ``final`` mAP of each trial."""
    check_kind(metric)
    frame = frame if "_config" in frame.columns else add_config_column(frame)
    usable = counted(frame, metric)
    datasets = sorted({d for d in usable["data.dataset"] if d is not None},
                      key=lambda d: (d != PAPER.dataset, d))
    tables = []
    for dataset in datasets:
        trials = usable[where_mask(usable, {"data.dataset": dataset})]
        table = DirectionsTable(dataset, metric)
        for claim in claims_for(trials):
            better, worse = _side(trials, claim.better, metric), _side(trials, claim.worse, metric)
            if not better.values or not worse.values:
                continue
            test = welch(better.values, worse.values) if min(better.n, worse.n) >= 2 else None
            interval = test.interval if test else None
            notes = []
            if interval is None:
                notes.append("fewer than 2 seeds on a side: no interval")
            for side in (better, worse):
                if side.configs > 1:
                    notes.append(f"{side.label}: best of {side.configs} configurations ({side.chosen})")
            found = verdict(interval)
            if claim.at_least and found == "inconclusive" and interval is not None:
                notes.append("the paper claims only 'at least as good': not contradicted")
            if any(where_mark(side.where) for side in (claim.better, claim.worse)):
                notes.append(UNTUNED_NOTE)
            table.rows.append(Direction(claim, better, worse, interval, found, tuple(notes),
                                        test.p_value if test else None))
        if table.rows:
            _apply_holm(table.rows)
            tables.append(table)
    return tables


def _apply_holm(rows: Sequence[Direction]) -> None:
    """Holm's correction over the claims of one table that have a test (the family read at once)."""
    tested = [row for row in rows if row.p_value is not None]
    for row, adjusted in zip(tested, holm([row.p_value for row in tested])):
        row.p_holm = adjusted
        row.verdict_holm = holm_verdict(row.diff, adjusted)


# ---- rendering -----------------------------------------------------------------------------------------

def _signed(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:+.{digits}f}"


def _interval_text(interval: tuple[float, float] | None) -> str:
    return DASH if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def _p_text(p: float | None) -> str:
    if p is None:
        return DASH
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _p_num(p: float | None) -> str:
    return "" if p is None else f"{p:.4g}"


CAPTION = ("mAP %, each trial's {which}. Ours: mean ± std over seeds (n trials) of each side; Δ = claimed "
           "better − other; 95 % Welch interval of Δ and Welch's two-sided p. Verdict: reproduced when the "
           "interval lies above 0, contradicted when below, inconclusive otherwise. Holm: the verdict after Holm's "
           "step-down correction over this table's {tested} tested claim(s) at family-wise 0.05 (p adjusted in "
           "brackets). The paper's Δ is on {paper}.")


def _which(metric: str) -> str:
    return "best evaluation (best_mAP)" if metric == "best" else "last evaluation (final_mAP)"


def _holm_text(row: Direction) -> str:
    return DASH if row.p_holm is None else f"{row.verdict_holm} ({_p_text(row.p_holm)})"


def _footnote(notes: list[str], note: str) -> int:
    """The footnote number of ``note``, added once however many rows carry it."""
    if note not in notes:
        notes.append(note)
    return notes.index(note) + 1


def to_markdown(tables: Sequence[DirectionsTable]) -> str:
    parts = []
    for table in tables:
        tested = sum(row.p_value is not None for row in table.rows)
        lines = [f"## {table.title}", "",
                 CAPTION.format(which=_which(table.metric), tested=tested, paper=PAPER.dataset_label), "",
                 "| Claim | Paper: table | Paper: cells | Paper Δ | Ours: claimed better | Ours: other | Ours Δ "
                 "| 95 % interval | p | Verdict | Holm |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
        notes: list[str] = []
        for row in table.rows:
            verdict_text = row.verdict
            verdict_text += "".join(f" [{_footnote(notes, n)}]" for n in row.notes)
            cells = [row.claim.name, row.claim.paper_source, row.claim.paper_cells,
                     _signed(row.claim.paper_diff, 1), f"{row.better.label}: {row.better.text()}",
                     f"{row.worse.label}: {row.worse.text()}", _signed(row.diff), _interval_text(row.interval),
                     _p_text(row.p_value), verdict_text, _holm_text(row)]
            lines.append(_md_row(cells))
        if notes:
            lines += [""] + [f"- [{i}] {note}" for i, note in enumerate(notes, 1)]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def to_csv(tables: Sequence[DirectionsTable]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(DIRECTIONS_CSV_COLUMNS)
    for table in tables:
        for row in table.rows:
            low, high = row.interval if row.interval else (None, None)
            writer.writerow([row.claim.name, table.dataset or "", row.claim.paper_source, row.claim.paper_cells,
                             _num(row.claim.paper_diff), row.better.label, _num(row.better.mean),
                             _num(row.better.std), row.better.n, row.worse.label, _num(row.worse.mean),
                             _num(row.worse.std), row.worse.n, _num(row.diff), _num(low), _num(high),
                             row.verdict, _p_num(row.p_value), _p_num(row.p_holm), row.verdict_holm, row.note])
    return buffer.getvalue()


def render_directions(tables: Sequence[DirectionsTable], fmt: str) -> str:
    """``md`` or ``csv``; LaTeX is not offered for this table."""
    if fmt == "md":
        return to_markdown(tables) if tables else "No claim has trials on both of its sides yet.\n"
    if fmt == "csv":
        return to_csv(tables)
    raise ValueError(f"the {NAME} table renders as md or csv, not {fmt!r}")
