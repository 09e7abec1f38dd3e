"""The closing lines of a study's console: which cell won, by how much, and what that is worth.

A *cell* is one combination of the searched values other than the seed (``train.seed``); the cells are
ranked by the mean over their seeds of the trials' best metric. With one seed per cell the gap between two
cells is no evidence of anything (the seed-to-seed spread of a small study is often larger than the gap),
so the summary says so and names the study that measures it.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from study.results.match import SEED_KEY
from study.results.untuned import mark

FIDELITY_COMMAND = "python -m study.run fidelity"


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _marks(group: pd.DataFrame) -> str:
    """The untuned mark of a cell's loss (study.results.untuned), "" when it needs none or has no loss."""
    if "loss.name" not in group.columns:
        return ""
    return ", ".join(sorted({mark(loss) for loss in group["loss.name"]} - {""}))


def closing_summary(table: pd.DataFrame, searched: Sequence[str], metric: str = "mAP", mode: str = "max",
                    study: str = "<study folder>") -> list[str]:
    """Lines naming the winning cell of ``table`` (a ``results.csv`` frame) and the runner-up, with the
    number of seeds behind them, and where to read which differences hold (``study``: the study's folder).
    Empty when no trial was evaluated."""
    score = f"best_{metric}"
    if score not in table.columns:
        return []
    rows = table[table[score].notna()]
    if rows.empty:
        return []
    keys = [k for k in searched if k != SEED_KEY and k in rows.columns]
    groups = rows.groupby(keys, dropna=False, sort=False) if keys else [((), rows)]
    cells = [(name if isinstance(name, tuple) else (name,), group[score].mean(), group[score].std(ddof=1),
              len(group), _marks(group)) for name, group in groups]
    cells.sort(key=lambda c: c[1], reverse=mode == "max")

    def label(cell: tuple) -> str:
        text = " ".join(f"{k}={_value(v)}" for k, v in zip(keys, cell[0])) or "the base config"
        return f"{text} ({cell[4]})" if cell[4] else text

    best = cells[0]
    seeds = best[3]
    lines = [f"winner: {label(best)}: {metric} {best[1]:.2f}"
             + (f" (mean of {seeds} seeds, sd {best[2]:.2f})" if seeds > 1 else " (one trial, one seed)")]
    if len(cells) > 1:
        second = cells[1]
        lines.append(f"runner-up: {label(second)}: {metric} {second[1]:.2f}, {abs(best[1] - second[1]):.2f} points "
                     f"behind")
    if seeds < 2:
        lines.append(f"One seed is not evidence: on a study this small the gap between two cells is within the "
                     f"spread between seeds of the same cell. `{FIDELITY_COMMAND}` runs cells over several seeds and "
                     f"says which differences hold.")
    else:
        lines.append(f"{seeds} seeds per cell: `python -m study.results {study} --table directions` gives the 95 % "
                     f"interval of each of the paper's claims these cells test.")
    return lines
