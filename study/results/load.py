"""Reading ``results.csv`` files (one per study folder) into one typed trial frame.

The column contract is in docs/architecture.md ("Study outputs"): bookkeeping and metric columns first
(metrics in percent, empty where a trial was not evaluated), then every key of the flattened Config.
Config columns are converted to the type of the Config default (``"True"`` -> ``True``, ``"0.997"`` ->
``0.997``); a config key absent from a file (a file written before the key existed) is read as its
default. Two internal columns are added: ``_source`` (the results.csv path) and ``_config`` (see
:mod:`study.results.match`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from reid_core.config import EVAL_METRICS, Config, flatten
from study.layout import RESULTS_FILE
from study.results.match import add_config_column

METRIC_KINDS = ("best", "final")  # best_* (evaluation with the best mAP) or final_* (last evaluation)
STATUSES = ("RUNNING", "TERMINATED", "STOPPED", "ERROR")
COUNTED = ("TERMINATED", "STOPPED")  # statuses whose metrics enter the tables
REQUIRED = ("study", "trial_id", "status", *(f"{kind}_{m}" for kind in METRIC_KINDS for m in EVAL_METRICS))
CONFIG_DEFAULTS: dict[str, Any] = flatten(Config())

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class ResultsError(ValueError):
    """A study folder or results.csv that cannot be read; the message names it."""


def results_path(path: str | Path) -> Path:
    """The results.csv of a study folder (or ``path`` itself when it is that file)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise ResultsError(f"study folder not found: {path}")
    candidate = path / RESULTS_FILE
    if not candidate.is_file():
        raise ResultsError(f"study folder {path} has no {RESULTS_FILE}")
    return candidate


def read_results(path: str | Path) -> pd.DataFrame:
    """One results.csv (or the one in a study folder) as a typed frame, one row per trial."""
    csv = results_path(path)
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{csv} is not a readable CSV file: {exc}") from exc
    missing = [name for name in REQUIRED if name not in frame.columns]
    if missing:
        raise ResultsError(f"{csv} lacks the column(s) {', '.join(missing)}")
    # Columns gathered first and framed once (a frame grown column by column warns of fragmentation).
    out: dict[str, Any] = {"study": frame["study"], "trial_id": frame["trial_id"],
                           "status": frame["status"].str.strip().str.upper()}
    for name in frame.columns:
        if name in ("study", "trial_id", "status"):
            continue
        if name in CONFIG_DEFAULTS:
            out[name] = _typed(frame[name], CONFIG_DEFAULTS[name], name, csv)
        elif name in ("cmc", "searched", "error", "pretrained/form", "pretrained/path"):
            out[name] = frame[name]
        else:  # metrics, epochs, best_epoch and any extra numeric bookkeeping
            out[name] = pd.to_numeric(frame[name].replace("", np.nan), errors="coerce")
    for name, default in CONFIG_DEFAULTS.items():
        if name not in out:
            out[name] = pd.Series([default] * len(frame), index=frame.index, dtype=object)
    out["_source"] = pd.Series([str(csv)] * len(frame), index=frame.index, dtype=object)
    return pd.DataFrame(out, index=frame.index)


def load_results(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every trial of one or several study folders, combined.

    The same folder given twice is read once; a (study, trial_id) pair seen in an earlier file is
    dropped from a later one (a copied study), and the number dropped is kept in ``frame.attrs``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    csvs: list[Path] = []
    for path in paths:
        csv = results_path(path).resolve()
        if csv not in csvs:
            csvs.append(csv)
    if not csvs:
        raise ResultsError("no study folder given")
    frame = pd.concat([read_results(csv) for csv in csvs], ignore_index=True)
    before = len(frame)
    frame = frame.drop_duplicates(subset=["study", "trial_id"], keep="first").reset_index(drop=True)
    frame = add_config_column(frame)
    frame.attrs["sources"] = [str(csv) for csv in csvs]
    frame.attrs["duplicates"] = before - len(frame)
    return frame


def counted(frame: pd.DataFrame, kind: str = "best") -> pd.DataFrame:
    """The trials whose metrics count: TERMINATED or STOPPED, with a ``<kind>_mAP`` value."""
    check_kind(kind)
    mask = frame["status"].isin(COUNTED) & frame[f"{kind}_mAP"].notna()
    return frame[mask]


def check_kind(kind: str) -> None:
    if kind not in METRIC_KINDS:
        raise ResultsError(f"metric must be one of {', '.join(METRIC_KINDS)}, got {kind!r}")


def _typed(column: pd.Series, default: Any, name: str, csv: Path) -> pd.Series:
    """A config column converted to the type of its Config default; empty cells become None."""
    if isinstance(default, bool):
        def to_bool(text: str) -> bool | None:
            low = text.strip().lower()
            if low == "":
                return None
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ResultsError(f"{csv}: column {name} holds {text!r}, not true/false")
        return column.map(to_bool).astype(object)
    if isinstance(default, (int, float)):
        numbers = pd.to_numeric(column.replace("", np.nan), errors="coerce")
        bad = numbers.isna() & (column.str.strip() != "")
        if bad.any():
            raise ResultsError(f"{csv}: column {name} holds {column[bad].iloc[0]!r}, not a number")
        if isinstance(default, int):
            return numbers.map(lambda v: None if pd.isna(v) else int(v)).astype(object)
        return numbers.map(lambda v: None if pd.isna(v) else float(v)).astype(object)
    return column.map(lambda text: None if text == "" else text).astype(object)
