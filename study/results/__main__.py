"""``python -m study.results <study dir>... [--table NAME|all] [--format md|csv|latex] [--out FILE]
[--plots DIR] [--metric best|final] [--pooled]``: the paper's tables from one or several studies.

Several study folders are combined into one set of trials, except for ``--table directions``, which reads
each folder as one regime and puts the regimes side by side (:mod:`study.results.regimes`) unless
``--pooled`` asks for one table of all their trials.

Exit status 0 on success, 2 on bad input (a folder without results.csv, an unknown table), with one
``error:`` line naming the problem and no traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from study.results.directions import NAME as DIRECTIONS
from study.results.directions import build_directions, render_directions
from study.results.load import METRIC_KINDS, ResultsError, load_results, results_path
from study.results.plots import write_plots
from study.results.regimes import build_regimes, regime_label, render_regimes, unique_labels
from study.results.render import FORMATS, render
from study.results.report import report_header
from study.results.tables import TABLE_NAMES, TableError, build_tables, check_name, report_tables


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m study.results",
        description="Rebuild the paper's tables (and plots) from the results.csv of one or several studies.")
    p.add_argument("studies", nargs="+", type=Path, metavar="STUDY_DIR",
                   help="study folder(s) holding results.csv (or the results.csv files); several are combined")
    p.add_argument("--table", default="all", metavar="NAME",
                   help=f"one of {', '.join(TABLE_NAMES)}, {DIRECTIONS} (the paper's claims: md or csv), or all "
                        "(default: every table with a trial, and the directions in md)")
    p.add_argument("--format", default="md", choices=FORMATS, help="output format (default md)")
    p.add_argument("--out", type=Path, help="write to this file instead of standard output")
    p.add_argument("--plots", type=Path, metavar="DIR", help="also write the PNG plots into DIR")
    p.add_argument("--metric", default="best", choices=METRIC_KINDS,
                   help="best: each trial's best evaluation (best_* columns, default); final: its last")
    p.add_argument("--pooled", action="store_true",
                   help=f"--table {DIRECTIONS} with several study folders: one table of all their trials instead "
                        "of the folders side by side, one regime each")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.table not in ("all", DIRECTIONS):
            try:
                check_name(args.table)
            except TableError as exc:
                raise TableError(f"{exc}, {DIRECTIONS}") from None
        if args.table == DIRECTIONS and args.format not in ("md", "csv"):
            raise TableError(f"the {DIRECTIONS} table renders as md or csv, not {args.format}")
        folders = _distinct(args.studies)
        if args.table == DIRECTIONS and len(folders) > 1 and not args.pooled:
            frames = [load_results(folder) for folder in folders]
            labels = unique_labels([regime_label(f, folder.name) for f, folder in zip(frames, folders)],
                                   [str(folder) for folder in folders])
            _emit(render_regimes(build_regimes(frames, labels, metric=args.metric), args.format), args.out)
            return 0
        frame = load_results(args.studies)
        if args.table == DIRECTIONS:
            text = render_directions(build_directions(frame, metric=args.metric), args.format)
            _emit(text, args.out)
            return 0
        if args.table == "all":
            tables = report_tables(frame, metric=args.metric)
        else:
            tables = build_tables(args.table, frame, metric=args.metric)
        header = report_header(frame, args.metric) if args.table == "all" else ""
        text = render(tables, args.format, header)
        if args.table == "all" and not tables and args.format != "csv":
            text += "\nNo counted trial matches a table yet.\n"
        if args.table == "all" and args.format == "md":
            directions = build_directions(frame, metric=args.metric)
            if directions:
                text += "\n" + render_directions(directions, "md")
        _emit(text, args.out)
        if args.plots:
            for path in write_plots(tables, frame, args.plots, metric=args.metric):
                print(f"wrote {path}", file=sys.stderr)
    except (ResultsError, TableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _distinct(studies: Sequence[Path]) -> list[Path]:
    """The study folders named, each once (a folder and its results.csv are the same study)."""
    out: list[Path] = []
    seen = set()
    for study in studies:
        key = results_path(study).resolve()
        if key not in seen:
            seen.add(key)
            out.append(study if study.is_dir() else study.parent)
    return out


def _emit(text: str, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    sys.exit(main())
