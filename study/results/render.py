"""Rendering built tables as Markdown, CSV or LaTeX.

Markdown and LaTeX show a dash where a cell has nothing (no trial, no paper number, no difference) and
``[n]`` after a value whose configuration footnote ``n`` names. CSV is long and machine-readable: one line
per cell with the numbers in their own columns, an empty field where Markdown shows a dash.
"""
from __future__ import annotations

import csv
import io
from typing import Sequence

from study.results.tables import DASH, Cell, Table

FORMATS = ("md", "csv", "latex")
CSV_COLUMNS = ("table", "dataset", "row", "column", "reference", "ours_mean", "ours_std", "n", "diff",
               "note")


def render(tables: Sequence[Table], fmt: str, header: str = "") -> str:
    """All ``tables`` in one document of format ``fmt`` (md, csv or latex); ``header`` leads md/latex."""
    if fmt == "md":
        return to_markdown(tables, header)
    if fmt == "csv":
        return to_csv(tables)
    if fmt == "latex":
        return to_latex(tables, header)
    raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")


def header_cells(table: Table) -> list[str]:
    """Column headings, flat (``mAP: VeRi-776 (paper)``, ``mAP: ours (synthetic)``, ``mAP: Δ``)."""
    out = list(table.row_headers)
    for label in table.columns:
        if table.show_reference:
            out += [f"{label}: {table.reference_label}", f"{label}: {table.ours_label}", f"{label}: Δ"]
        else:
            out.append(f"{label}: {table.ours_label}")
    return out


def body_cells(table: Table) -> list[list[str]]:
    """The rows as text, in :func:`header_cells` order."""
    rows = []
    for row in table.rows:
        line = list(row.labels)
        for cell in row.cells:
            ours = _ours(cell)
            line += [cell.paper_text(), ours, cell.diff_text()] if table.show_reference else [ours]
        rows.append(line)
    return rows


def to_markdown(tables: Sequence[Table], header: str = "") -> str:
    parts = [header.rstrip() + "\n"] if header else []
    for table in tables:
        head = header_cells(table)
        aligns = ["---"] * len(table.row_headers) + ["---:"] * (len(head) - len(table.row_headers))
        lines = [f"## {table.title}", "", table.caption, "",
                 _md_row(head), _md_row(aligns), *(_md_row(r) for r in body_cells(table))]
        if table.notes:
            lines += [""] + [f"- [{i}] {note}" for i, note in enumerate(table.notes, 1)]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def to_csv(tables: Sequence[Table]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for table in tables:
        for row in table.rows:
            for label, cell in zip(table.columns, row.cells):
                writer.writerow([table.name, table.dataset or "", " / ".join(row.labels), label,
                                 _num(cell.paper), _num(cell.mean), _num(cell.std), cell.n if cell.n else "",
                                 _num(cell.diff), cell.note or ""])
    return buffer.getvalue()


def to_latex(tables: Sequence[Table], header: str = "") -> str:
    """Tabular environments (``\\checkmark`` needs the amssymb package)."""
    parts = [f"% {_tex(line)}" for line in header.splitlines()] if header else []
    for table in tables:
        n_labels = len(table.row_headers)
        per = 3 if table.show_reference else 1
        spec = "l" * n_labels + ("|" + "r" * per) * len(table.columns)
        lines = [r"\begin{table}[htbp]", r"\centering",
                 rf"\caption{{{_tex(table.title)}. {_tex(table.caption)}}}",
                 rf"\label{{tab:{table.name}{'-' + table.dataset if table.dataset else ''}}}",
                 rf"\begin{{tabular}}{{{spec}}}", r"\hline"]
        if table.show_reference:
            top = [""] * n_labels + [rf"\multicolumn{{3}}{{c}}{{{_tex(c)}}}" for c in table.columns]
            sub = [_tex(h) for h in table.row_headers]
            sub += [_tex(table.reference_label), _tex(table.ours_label), r"$\Delta$"] * len(table.columns)
            lines += [" & ".join(top) + r" \\", " & ".join(sub) + r" \\"]
        else:
            lines.append(" & ".join(_tex(h) for h in [*table.row_headers, *table.columns]) + r" \\")
        lines.append(r"\hline")
        lines += [" & ".join(_tex(text) for text in row) + r" \\" for row in body_cells(table)]
        lines += [r"\hline", r"\end{tabular}"]
        if table.notes:
            notes = r" \\ ".join(f"[{i}] {_tex(note)}" for i, note in enumerate(table.notes, 1))
            lines.append(rf"\par\smallskip{{\footnotesize {notes}}}")
        lines.append(r"\end{table}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _ours(cell: Cell) -> str:
    text = cell.ours_text()
    return f"{text} [{cell.note}]" if cell.note and text != DASH else text


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}".rstrip("0").rstrip(".")


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "α": r"$\alpha$", "β": r"$\beta$", "✓": r"$\checkmark$",
                "✗": r"$\times$", "—": "---", "−": "$-$", "≥": r"$\geq$", "×": r"$\times$"}


def _tex(text: str) -> str:
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)
    return "".join(_TEX_UNICODE.get(ch, ch) for ch in out)
