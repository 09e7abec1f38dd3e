"""``python -m study.results <study dir>... [--table NAME|all] [--format md|csv|latex] [--out FILE]
[--plots DIR] [--metric best|final]``: the paper's tables from one or several studies.

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
from study.results.load import METRIC_KINDS, ResultsError, load_results
from study.results.plots import write_plots
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


def _emit(text: str, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    sys.exit(main())
