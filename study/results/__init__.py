"""The paper's tables and plots from finished trials (``results.csv`` of one or several studies).

Public API: :func:`write_report` (``results.md`` + ``plots/``, called by the driver at the end of a study,
:mod:`study.driver.outcome`), :func:`load_results`, :func:`build_table` / :func:`build_tables` /
:func:`report_tables` returning
:class:`Table` objects, :func:`render` (md, csv, latex) and :func:`write_plots`. CLI:
``python -m study.results <study dir>... [--table NAME|all] [--format md|csv|latex] [--out FILE]
[--plots DIR] [--metric best|final] [--pooled]``: several folders are combined, except for
``--table directions``, which puts them side by side, one regime each (:mod:`study.results.regimes`).
The directions' statistics (Welch, Holm) are in :mod:`study.results.directions`; the losses marked untuned
in every table, legend and summary in :mod:`study.results.untuned`. Matching rules: docs/results.md.
"""
from study.results.load import ResultsError, load_results, read_results
from study.results.plots import write_plots
from study.results.render import FORMATS, render
from study.results.report import report_header, write_report
from study.results.tables import (TABLE_NAMES, Cell, Row, Table, TableError, applies, build_table, build_tables,
                                  report_tables)

__all__ = ["FORMATS", "TABLE_NAMES", "Cell", "ResultsError", "Row", "Table", "TableError", "applies",
           "build_table", "build_tables", "load_results", "read_results", "render", "report_header",
           "report_tables", "write_plots", "write_report"]
