"""The ``directions`` table: does each of the paper's claims (A beats B) hold in our trials?

A claim compares two cells of trials (its *better* and *worse* sides, each a set of conditions on config
columns, matched as every other table matches its cells: :func:`study.results.match.select`). Per claim:
the paper's table and cells, the paper's difference (from :data:`study.results.paper.PAPER`; none where the
number is in the main text, which is not in our hands), ours as mean ± std over seeds on each side, our
difference with a 95 % Welch interval, and a verdict:

- ``reproduced``: the interval lies above 0 (the claimed side is better);
- ``contradicted``: the interval lies below 0 (the other side is better);
- ``inconclusive``: the interval holds 0, or a side has fewer than 2 seeds (no interval).

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

from study.results.paper import PAPER, Ref
from study.results.load import check_kind, counted
from study.results.match import add_config_column, describe, select, where_mask
from study.results.render import _md_row, _num
from study.results.tables import DASH, DATASET_LABELS

NAME = "directions"
VERDICTS = ("reproduced", "contradicted", "inconclusive")
CONFIDENCE = 0.95
DIRECTIONS_CSV_COLUMNS = ("claim", "dataset", "paper_source", "paper_cells", "paper_diff", "better", "better_mean",
               "better_std", "better_n", "worse", "worse_mean", "worse_std", "worse_n", "diff", "ci_low",
               "ci_high", "verdict", "note")

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

def _t_cdf(x: float, df: float) -> float:
    """Student's t cumulative distribution at ``x >= 0`` (composite Simpson over the density, 1e-9 here)."""
    if x <= 0:
        return 0.5
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 4000  # even
    grid = np.linspace(0.0, x, n + 1)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid * grid / df))
    weights = np.ones(n + 1)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return 0.5 + float((weights * density).sum()) * x / (3 * n)


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (``0.5 <= p < 1``) of Student's t with ``df`` > 0 degrees of freedom (bisection)."""
    if not 0.5 <= p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df > 0; got p={p}, df={df}")
    if math.isinf(df):
        df = 1e9
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Welch's ``confidence`` interval of mean(a) − mean(b) (unequal variances); both need 2+ values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's interval needs at least 2 values per side; got {len(a)} and {len(b)}")
    diff = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(0.5 + confidence / 2, df) * se
    return diff - half, diff + half


def verdict(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return "inconclusive"
    low, high = interval
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "inconclusive"


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
    note: str = ""

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
    selection = select(trials[where_mask(trials, side.where)], kind)
    if selection is None:
        return SideResult(side.label)
    chosen = describe(selection.differing) if selection.n_configs > 1 else ""
    return SideResult(side.label, tuple(float(v) for v in selection.values(f"{kind}_mAP")),
                      selection.n_configs, chosen)


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
            interval = welch_interval(better.values, worse.values) if min(better.n, worse.n) >= 2 else None
            notes = []
            if interval is None:
                notes.append("fewer than 2 seeds on a side: no interval")
            for side in (better, worse):
                if side.configs > 1:
                    notes.append(f"{side.label}: best of {side.configs} configurations ({side.chosen})")
            found = verdict(interval)
            if claim.at_least and found == "inconclusive" and interval is not None:
                notes.append("the paper claims only 'at least as good': not contradicted")
            table.rows.append(Direction(claim, better, worse, interval, found, "; ".join(notes)))
        if table.rows:
            tables.append(table)
    return tables


# ---- rendering -----------------------------------------------------------------------------------------

def _signed(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:+.{digits}f}"


def _interval_text(interval: tuple[float, float] | None) -> str:
    return DASH if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def to_markdown(tables: Sequence[DirectionsTable]) -> str:
    parts = []
    for table in tables:
        which = "best evaluation (best_mAP)" if table.metric == "best" else "last evaluation (final_mAP)"
        lines = [f"## {table.title}", "",
                 f"mAP %, each trial's {which}. Ours: mean ± std over seeds (n trials) of each side; Δ = claimed "
                 f"better − other; 95 % Welch interval of Δ. Verdict: reproduced when the interval lies above 0, "
                 f"contradicted when below, inconclusive otherwise. The paper's Δ is on {PAPER.dataset_label}.", "",
                 "| Claim | Paper: table | Paper: cells | Paper Δ | Ours: claimed better | Ours: other | Ours Δ "
                 "| 95 % interval | Verdict |",
                 "|---|---|---|---:|---:|---:|---:|---:|---|"]
        notes = []
        for row in table.rows:
            verdict_text = row.verdict
            if row.note:
                notes.append(row.note)
                verdict_text += f" [{len(notes)}]"
            cells = [row.claim.name, row.claim.paper_source, row.claim.paper_cells,
                     _signed(row.claim.paper_diff, 1), f"{row.better.label}: {row.better.text()}",
                     f"{row.worse.label}: {row.worse.text()}", _signed(row.diff), _interval_text(row.interval),
                     verdict_text]
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
                             row.verdict, row.note])
    return buffer.getvalue()


def render_directions(tables: Sequence[DirectionsTable], fmt: str) -> str:
    """``md`` or ``csv``; LaTeX is not offered for this table."""
    if fmt == "md":
        return to_markdown(tables) if tables else "No claim has trials on both of its sides yet.\n"
    if fmt == "csv":
        return to_csv(tables)
    raise ValueError(f"the {NAME} table renders as md or csv, not {fmt!r}")
