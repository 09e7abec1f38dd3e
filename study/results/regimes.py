"""The directions table of several regimes side by side: the same claims, one study per regime.

``python -m study.results <study A> <study B> --table directions`` reads each study folder as one regime
(its trials are not pooled with the others'), builds each regime's directions table
(:func:`study.results.directions.build_directions`, Holm's correction within each regime's family of
claims) and lines the claims up: per regime the difference, its 95 % Welch interval, the verdict and the
verdict after Holm; a last column says whether the verdict changes between the regimes. A claim that a
regime did not test shows a dash there. Markdown is wide (one row per claim); CSV is long (one line per
claim and regime, the directions CSV with a leading ``regime`` column).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from study.results.directions import (DIRECTIONS_CSV_COLUMNS, Direction, DirectionsTable, _footnote,
                                      _interval_text, _p_num, _p_text, _signed, _which, build_directions)
from study.results.load import ResultsError
from study.results.paper import PAPER
from study.results.render import _md_row, _num
from study.results.tables import DASH, DATASET_LABELS

REGIMES_CSV_COLUMNS = ("regime", *DIRECTIONS_CSV_COLUMNS)


@dataclass
class Regime:
    """One study read as one regime: its label (the study's name) and its directions tables."""

    label: str
    tables: list[DirectionsTable]

    def row(self, dataset: str | None, claim: str) -> Direction | None:
        for table in self.tables:
            if table.dataset == dataset:
                return next((row for row in table.rows if row.claim.name == claim), None)
        return None


@dataclass
class ComparedClaim:
    name: str
    paper_diff: float | None
    by_regime: list[Direction | None]

    @property
    def changes(self) -> bool | None:
        """Whether the per-claim verdict differs between the regimes that tested the claim (None: fewer than
        two did)."""
        found = [row.verdict for row in self.by_regime if row is not None]
        return None if len(found) < 2 else len(set(found)) > 1


@dataclass
class Comparison:
    dataset: str | None
    metric: str
    labels: list[str]
    claims: list[ComparedClaim] = field(default_factory=list)

    @property
    def title(self) -> str:
        label = DATASET_LABELS.get(self.dataset, self.dataset) if self.dataset else "all datasets"
        return f"Directions by regime: {' vs '.join(self.labels)} (ours on {label})"


def regime_label(frame: pd.DataFrame, fallback: str) -> str:
    """A regime's name: its study's name when the folder holds one study, else ``fallback`` (the folder)."""
    names = sorted({str(s) for s in frame["study"] if s})
    return names[0] if len(names) == 1 else fallback


def unique_labels(labels: Sequence[str], fallbacks: Sequence[str]) -> list[str]:
    """``labels``, with the folder names used instead wherever two regimes share a study name."""
    if len(set(labels)) == len(labels):
        return list(labels)
    if len(set(fallbacks)) == len(fallbacks):
        return list(fallbacks)
    return [f"{label} ({i})" for i, label in enumerate(labels, 1)]


def compare(regimes: Sequence[Regime], *, metric: str = "best") -> list[Comparison]:
    """One comparison per dataset any regime holds claims on; claims in each regime's table order, a claim
    first met in a later regime after the earlier ones'."""
    if len(regimes) < 2:
        raise ResultsError(f"a side-by-side directions table needs at least 2 regimes, got {len(regimes)}")
    datasets: list[str | None] = []
    for regime in regimes:
        datasets += [t.dataset for t in regime.tables if t.dataset not in datasets]
    datasets.sort(key=lambda d: (d != PAPER.dataset, str(d)))
    out = []
    for dataset in datasets:
        comparison = Comparison(dataset, metric, [r.label for r in regimes])
        seen: list[str] = []
        for regime in regimes:
            for table in regime.tables:
                if table.dataset == dataset:
                    seen += [row.claim.name for row in table.rows if row.claim.name not in seen]
        for name in seen:
            rows = [regime.row(dataset, name) for regime in regimes]
            paper = next(row.claim.paper_diff for row in rows if row is not None)
            comparison.claims.append(ComparedClaim(name, paper, rows))
        out.append(comparison)
    return out


def build_regimes(frames: Sequence[pd.DataFrame], labels: Sequence[str], *, metric: str = "best") -> list[Comparison]:
    """The side-by-side comparisons of studies ``frames`` (one frame per regime, labelled ``labels``)."""
    return compare([Regime(label, build_directions(frame, metric=metric)) for frame, label in zip(frames, labels)],
                   metric=metric)


# ---- rendering -----------------------------------------------------------------------------------------

def _changes_text(claim: ComparedClaim) -> str:
    return {None: DASH, True: "yes", False: "no"}[claim.changes]


def to_markdown(comparisons: Sequence[Comparison]) -> str:
    parts = []
    for comparison in comparisons:
        head = ["Claim", "Paper Δ"]
        for label in comparison.labels:
            head += [f"{label}: Δ", f"{label}: 95 % interval", f"{label}: verdict", f"{label}: Holm"]
        head.append("Verdict changes")
        aligns = ["---", "---:"] + ["---:", "---:", "---", "---"] * len(comparison.labels) + ["---"]
        lines = [f"## {comparison.title}", "",
                 f"mAP %, each trial's {_which(comparison.metric)}, each regime's study read alone. Per regime: "
                 "Δ = claimed better − other (mean over seeds of each side; the sides' means and n are in the CSV), its 95 % Welch interval, "
                 "the verdict (reproduced: interval above 0; contradicted: below; inconclusive otherwise) and "
                 "the verdict after Holm's step-down correction over that regime's tested claims at "
                 f"family-wise 0.05 (adjusted p in brackets). The paper's Δ is on {PAPER.dataset_label}; — where "
                 "a regime lacks a side of the claim.", "", _md_row(head), _md_row(aligns)]
        notes: list[str] = []
        for claim in comparison.claims:
            cells = [claim.name, _signed(claim.paper_diff, 1)]
            for row in claim.by_regime:
                if row is None:
                    cells += [DASH] * 4
                    continue
                verdict_text = row.verdict + "".join(f" [{_footnote(notes, n)}]" for n in row.notes)
                holm = DASH if row.p_holm is None else f"{row.verdict_holm} ({_p_text(row.p_holm)})"
                cells += [_signed(row.diff), _interval_text(row.interval), verdict_text, holm]
            cells.append(_changes_text(claim))
            lines.append(_md_row(cells))
        sides = {}
        for claim in comparison.claims:
            row = next(r for r in claim.by_regime if r is not None)
            sides[claim.name] = f"{row.better.label} vs {row.worse.label}"
        lines += ["", "Sides: " + "; ".join(f"{name}: {text}" for name, text in sides.items()) + "."]
        if notes:
            lines += [""] + [f"- [{i}] {note}" for i, note in enumerate(notes, 1)]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def to_csv(comparisons: Sequence[Comparison]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REGIMES_CSV_COLUMNS)
    for comparison in comparisons:
        for claim in comparison.claims:
            for label, row in zip(comparison.labels, claim.by_regime):
                if row is None:
                    continue
                low, high = row.interval if row.interval else (None, None)
                writer.writerow([label, row.claim.name, comparison.dataset or "", row.claim.paper_source,
                                 row.claim.paper_cells, _num(row.claim.paper_diff), row.better.label,
                                 _num(row.better.mean), _num(row.better.std), row.better.n, row.worse.label,
                                 _num(row.worse.mean), _num(row.worse.std), row.worse.n, _num(row.diff), _num(low),
                                 _num(high), row.verdict, _p_num(row.p_value), _p_num(row.p_holm),
                                 row.verdict_holm, row.note])
    return buffer.getvalue()


def render_regimes(comparisons: Sequence[Comparison], fmt: str) -> str:
    """``md`` or ``csv``."""
    if fmt == "md":
        return to_markdown(comparisons) if comparisons else "No claim has trials on both of its sides yet.\n"
    if fmt == "csv":
        return to_csv(comparisons)
    raise ValueError(f"the side-by-side directions table renders as md or csv, not {fmt!r}")
