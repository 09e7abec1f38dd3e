"""``results.md`` and ``plots/``: what ``study.run`` writes at the end of every study."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import pandas as pd

from study.results.directions import build_directions, render_directions
from study.results.load import COUNTED, STATUSES, check_kind, counted, load_results, results_path
from study.results.plots import write_plots
from study.results.render import to_markdown
from study.results.tables import DATASET_LABELS, report_tables


def report_header(frame: pd.DataFrame, metric: str = "best") -> str:
    """A short Markdown header: the studies, their trial counts by status, the datasets and the metric."""
    lines = ["# Study results", ""]
    for study, rows in frame.groupby("study", sort=True):
        sources = sorted(set(rows["_source"]))
        lines.append(f"- Study `{study}` ({', '.join(f'`{s}`' for s in sources)}): {_counts(rows)}")
    if frame.empty:
        lines += [f"- `{source}`: no trial yet" for source in frame.attrs.get("sources", [])]
    datasets = sorted({d for d in frame["data.dataset"] if d is not None}, key=str)
    lines.append(f"- Datasets: {', '.join(DATASET_LABELS.get(d, d) for d in datasets) or 'none'}")
    which = "each trial's best evaluation (`best_*`)" if metric == "best" else "each trial's last evaluation (`final_*`)"
    lines.append(f"- Metric: {which}; counted trials are {' and '.join(COUNTED)} with a value, "
                 f"{len(counted(frame, metric))} of {len(frame)}.")
    if frame.attrs.get("duplicates"):
        lines.append(f"- {frame.attrs['duplicates']} trial(s) seen in an earlier results.csv were ignored.")
    return "\n".join(lines) + "\n"


def write_report(study_dirs: str | Path | Iterable[str | Path], out: str | Path | None = None,
                 plots_dir: str | Path | None = None, *, metric: str = "best") -> Path:
    """Write ``results.md`` (every table that applies) and the plots; return the Markdown file's path.

    ``study_dirs``: one study folder or several (their results.csv files are combined). ``out`` defaults
    to ``<first study>/results.md``, ``plots_dir`` to ``plots/`` beside ``out``. A study with no finished
    trial still gets a report (header and a line saying so), so that the end of a study never fails here.
    """
    check_kind(metric)
    dirs = [study_dirs] if isinstance(study_dirs, (str, Path)) else list(study_dirs)
    frame = load_results(dirs)
    first = results_path(dirs[0]).parent
    out = Path(out) if out is not None else first / "results.md"
    plots_dir = Path(plots_dir) if plots_dir is not None else out.parent / "plots"
    tables = report_tables(frame, metric=metric)
    plots = write_plots(tables, frame, plots_dir, metric=metric)
    text = to_markdown(tables, report_header(frame, metric))
    if not tables:
        text += "\nNo counted trial matches a table yet.\n"
    directions = build_directions(frame, metric=metric)
    if directions:  # the paper's claims, whenever the study has both cells of one
        text += "\n" + render_directions(directions, "md")
    if plots:
        text += "\n## Plots\n\n" + "\n".join(
            f"![{p.stem}]({Path(os.path.relpath(p, out.parent)).as_posix()})" for p in plots) + "\n"
    _write_atomic(out, text)
    return out


def _counts(rows: pd.DataFrame) -> str:
    found = rows["status"].value_counts()
    order = [s for s in STATUSES if s in found] + sorted(s for s in found.index if s not in STATUSES)
    return f"{len(rows)} trial(s): " + ", ".join(f"{found[s]} {s}" for s in order)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

