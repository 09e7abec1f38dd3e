"""The results module (study/results) and the paper's numbers (study/paper.py).

Fixtures are results.csv files written here with the full column contract of docs/architecture.md
("Study outputs"): the bookkeeping and metric columns, then every key of ``flatten(Config())``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reid_core.config import Config, flatten
from study.results.paper import PAPER
from study.results import (TABLE_NAMES, ResultsError, TableError, applies, build_table, build_tables,
                           load_results, render, report_tables, write_plots, write_report)

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("mAP", "R1", "R5", "R10", "mINP")
# The column order of results.csv, exactly as docs/architecture.md lists it.
HEADER = ["study", "trial_id", "status", "epochs", *(f"final_{m}" for m in METRICS),
          *(f"best_{m}" for m in METRICS), "best_epoch", "cmc", "searched", *flatten(Config())]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def trial(trial_id: str, mAP: float | None, cfg: dict | None = None, *, status: str = "TERMINATED",
          study: str = "s", final: float | None = None) -> dict:
    """One results.csv row: best_R1 = mAP + 10, best_R5 = +15, best_R10 = +17, best_mINP = -20; final_* the
    same offsets from ``final`` (default mAP - 1). ``mAP`` None: a trial that was never evaluated."""
    cfg = dict(cfg or {})
    row = {"study": study, "trial_id": trial_id, "status": status, "epochs": 4 if mAP is not None else 0,
           "best_epoch": 4 if mAP is not None else "", "searched": ";".join(sorted(cfg))}
    offsets = {"mAP": 0, "R1": 10, "R5": 15, "R10": 17, "mINP": -20}
    final = (mAP - 1 if mAP is not None else None) if final is None else final
    for m, offset in offsets.items():
        row[f"best_{m}"] = "" if mAP is None else mAP + offset
        row[f"final_{m}"] = "" if final is None else final + offset
    row["cmc"] = "" if mAP is None else json.dumps([min(100.0, mAP + 10 + 2 * r) for r in range(20)])
    row.update(flatten(Config().replace(cfg)))
    return row


def write_study(folder: Path, rows: list[dict], *, header: list[str] = HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return folder


VERI = {"data.dataset": "veri776"}
HE_MOREID = {"loss.name": "he", "framework.name": "moreid"}


def seeds(prefix: str, values: list[float], cfg: dict, **kwargs) -> list[dict]:
    return [trial(f"{prefix}{i}", v, {**cfg, "train.seed": i}, **kwargs) for i, v in enumerate(values)]


# ---- cells: seeds, dashes, paper numbers, differences ----------------------------------------------------

def test_loss_comparison_mean_std_over_seeds_and_dashes(tmp_path):
    rows = (seeds("he", [80.0, 82.0, 84.0], {**VERI, **HE_MOREID})
            + [trial("tb", 70.0, {**VERI, "loss.name": "triplet", "framework.name": "baseline"})]
            + [trial("err", None, {**VERI, "loss.name": "npair", "framework.name": "baseline"}, status="ERROR")]
            + [trial("run", 99.0, {**VERI, "loss.name": "npair", "framework.name": "moreid"}, status="RUNNING")])
    frame = load_results(write_study(tmp_path / "a", rows))
    table = build_table("loss_comparison", frame)
    he = table.cell(("HE", "MoReID"), "mAP")
    assert (he.n, he.mean, he.std) == (3, 82.0, 2.0)
    assert he.ours_text() == "82.00 ± 2.00 (n=3)"
    assert table.cell(("HE", "MoReID"), "R1").mean == 92.0
    single = table.cell(("Triplet", "Baseline"), "mAP")
    assert (single.n, single.mean, single.std, single.ours_text()) == (1, 70.0, None, "70.00")
    # The ERROR trial and the RUNNING one never count: their cells are dashes, and a note counts them.
    for row in (("N-pair", "Baseline"), ("N-pair", "MoReID"), ("Ranked List (untuned α/β)", "MoReID")):
        cell = table.cell(row, "mAP")
        assert cell.mean is None and cell.n == 0 and cell.ours_text() == "—"
    assert any("1 ERROR, 1 RUNNING" in note for note in table.notes)
    # The main paper's numbers are not in our hands: every reference cell is a dash, and a note says so.
    assert all(cell.paper is None and cell.diff is None for row in table.rows for cell in row.cells)
    assert any(PAPER.missing["loss_comparison"] in note for note in table.notes)
    assert table.trials == 4


def test_past_positives_paper_column_and_difference_on_veri776(tmp_path):
    rows = (seeds("a", [83.0, 84.0], {**VERI, **HE_MOREID, "framework.momentum": 0.997})
            + [trial("b", 80.0, {**VERI, **HE_MOREID, "framework.momentum": 0.995,
                                 "framework.include_past_positives": True})])
    table = build_table("past_positives", load_results(write_study(tmp_path / "s", rows)))
    assert table.dataset == "veri776" and table.reference_label == "VeRi-776 (paper)"
    ours = table.cell("✗ (paper's method)", "m = 0.997")
    assert ours.paper == 83.3 and ours.mean == 83.5 and ours.std == pytest.approx(math.sqrt(0.5))
    assert ours.diff == pytest.approx(0.2) and ours.diff_text() == "+0.20"
    past = table.cell("✓", "m = 0.995")
    assert (past.paper, past.mean, past.diff_text()) == (80.6, 80.0, "-0.60")
    empty = table.cell("✓", "m = 0.999")
    assert empty.paper == 81.3 and empty.mean is None and empty.diff is None
    # Every reference number is the one in study/paper.py.
    for (m, include), ref in PAPER.past_positives.items():
        label = "✓" if include else "✗ (paper's method)"
        assert table.cell(label, f"m = {m:g}").paper == ref.value


def test_other_dataset_keeps_reference_labelled_and_computes_no_difference(tmp_path):
    rows = [trial("t", 60.0, {"data.dataset": "synthetic", **HE_MOREID}),
            trial("c", 58.0, {"data.dataset": "synthetic", **HE_MOREID, "loss.distance": "cosine"})]
    table = build_table("similarity", load_results(write_study(tmp_path / "s", rows)))
    assert table.dataset == "synthetic"
    assert table.reference_label == "VeRi-776 (paper)" and table.ours_label == "ours (synthetic)"
    euclid = table.cell(("HE", "euclidean"), "mAP")
    assert (euclid.paper, euclid.mean, euclid.diff) == (83.3, 60.0, None)
    assert table.cell(("HE", "cosine"), "mAP").mean == 58.0
    assert table.cell(("Triplet", "any"), "mAP").paper == 79.4
    assert "ours are on synthetic, so Δ is not computed" in table.caption


def test_best_configuration_is_chosen_and_named_and_unused_knobs_do_not_split_seeds(tmp_path):
    rows = (seeds("lo", [60.0, 62.0], {**VERI, **HE_MOREID, "loss.he_margin": 0.1})
            + seeds("hi", [64.0, 66.0], {**VERI, **HE_MOREID, "loss.he_margin": 0.2})
            # loss.k is an N-pair knob: for the triplet loss these two are seeds of one configuration.
            + [trial("t0", 50.0, {**VERI, "loss.name": "triplet", "loss.k": 3, "train.seed": 0}),
               trial("t1", 52.0, {**VERI, "loss.name": "triplet", "loss.k": 9, "train.seed": 1})])
    table = build_table("loss_comparison", load_results(write_study(tmp_path / "s", rows)))
    he = table.cell(("HE", "MoReID"), "mAP")
    assert (he.mean, he.n, he.values) == (65.0, 2, (64.0, 66.0))
    assert table.cell(("HE", "MoReID"), "R1").mean == 75.0  # R1 of the same chosen configuration
    assert he.note is not None
    assert table.notes[he.note - 1] == ("HE / MoReID: best of 2 configurations by mean best_mAP: "
                                        "loss.he_margin=0.2.")
    triplet = table.cell(("Triplet", "MoReID"), "mAP")
    assert (triplet.n, triplet.mean, triplet.note) == (2, 51.0, None)


def test_final_metric_uses_the_last_evaluation(tmp_path):
    rows = [trial("t", 80.0, {**VERI, **HE_MOREID}, final=75.0)]
    frame = load_results(write_study(tmp_path / "s", rows))
    assert build_table("loss_comparison", frame, metric="final").cell(("HE", "MoReID"), "mAP").mean == 75.0
    assert build_table("loss_comparison", frame).cell(("HE", "MoReID"), "mAP").mean == 80.0
    with pytest.raises(ResultsError, match="metric must be one of best, final"):
        build_table("loss_comparison", frame, metric="last")


def test_stopped_trials_count_and_unevaluated_ones_do_not(tmp_path):
    rows = [trial("a", 70.0, {**VERI, **HE_MOREID}, status="STOPPED"),
            trial("b", None, {**VERI, **HE_MOREID, "train.seed": 1}, status="TERMINATED")]
    table = build_table("loss_comparison", load_results(write_study(tmp_path / "s", rows)))
    assert table.cell(("HE", "MoReID"), "mAP").n == 1
    assert any("1 TERMINATED without best_mAP" in note for note in table.notes)


def test_backbone_gain_against_the_paper(tmp_path):
    plain = {**VERI, "framework.name": "moreid", "data.autoaug": False, "model.ibn": False,
             "model.non_local": False}
    rows = [trial("t", 70.0, {**plain, "loss.name": "triplet"}), trial("h", 75.0, {**plain, "loss.name": "he"})]
    table = build_table("backbone", load_results(write_study(tmp_path / "s", rows)))
    gain = table.cell(("✗", "✗", "✗"), "HE gain")
    assert (gain.mean, gain.paper) == (5.0, 2.5) and gain.diff == pytest.approx(2.5)
    assert (gain.ours_text(), gain.paper_text(), gain.diff_text()) == ("+5.00", "+2.5", "+2.50")
    assert table.cell(("✓", "✓", "✓"), "HE").paper == 83.3
    assert table.cell(("✓", "✓", "✓"), "HE gain").mean is None


def test_two_study_folders_are_combined(tmp_path):
    a = write_study(tmp_path / "veri", seeds("v", [80.0, 81.0], {**VERI, **HE_MOREID}, study="veri"))
    b = write_study(tmp_path / "market", [trial("m", 70.0, {"data.dataset": "market1501", **HE_MOREID},
                                                study="market")])
    frame = load_results([a, b, a])  # the same folder twice is read once
    assert len(frame) == 3
    table = build_table("datasets", frame)
    assert table.cell("VeRi-776", "mAP").mean == 80.5 and table.cell("VeRi-776", "mINP").mean == 60.5
    assert table.cell("Market-1501", "R5").mean == 85.0
    assert table.cell("VeRi-Wild large", "mAP").ours_text() == "—"
    assert all(cell.paper is None for row in table.rows for cell in row.cells)
    per_dataset = build_tables("loss_comparison", frame)
    assert [t.dataset for t in per_dataset] == ["veri776", "market1501"]
    assert per_dataset[1].cell(("HE", "MoReID"), "mAP").mean == 70.0


def test_sweep_tables_and_which_tables_a_report_shows(tmp_path):
    rows = []
    for k, v in ((5, 40.0), (15, 44.0), (25, 42.0)):
        rows.append(trial(f"k{k}", v, {**VERI, "loss.name": "npair", "loss.k": k, "framework.name": "baseline"}))
    for a, b, v in ((1.2, 0.4, 50.0), (1.2, 0.8, 48.0), (1.6, 0.4, 47.0)):
        rows.append(trial(f"r{a}{b}", v, {**VERI, "loss.name": "ranked_list", "loss.alpha": a, "loss.beta": b,
                                          "framework.name": "baseline"}))
    rows.append(trial("d", 60.0, {**VERI, **HE_MOREID, "framework.dict_size": 1024}))
    frame = load_results(write_study(tmp_path / "s", rows))
    npair = build_table("npair_k", frame)
    assert [r.labels[0] for r in npair.rows] == ["5", "15 (paper's optimum)", "25"]
    assert npair.cell("15 (paper's optimum)", "Baseline").mean == 44.0
    assert npair.cell("5", "MoReID").ours_text() == "—"
    assert not npair.show_reference and npair.points == 3 and applies(npair)
    assert any("Baseline: k = 15 (mAP 44.00)" in note for note in npair.notes)
    ranked = build_table("ranked_list", frame)
    assert ranked.columns == ["β = 0.4", "β = 0.8"]
    assert [r.labels for r in ranked.rows] == [("Baseline", "1.2"), ("Baseline", "1.6")]
    assert ranked.cell(("Baseline", "1.2"), "β = 0.8").mean == 48.0
    assert ranked.cell(("Baseline", "1.6"), "β = 0.8").mean is None
    assert ranked.points == 3
    dictionary = build_table("dictionary_size", frame)
    assert dictionary.points == 1 and not applies(dictionary)  # one size is not a sweep
    names = [t.name for t in report_tables(frame)]
    assert names == ["loss_comparison", "past_positives", "similarity", "backbone", "datasets", "npair_k",
                     "ranked_list"]


def test_unknown_table_and_dataset_are_errors(tmp_path):
    frame = load_results(write_study(tmp_path / "s", [trial("t", 1.0)]))
    with pytest.raises(TableError, match="known tables: loss_comparison, past_positives"):
        build_table("losses", frame)
    with pytest.raises(TableError, match="unknown dataset 'veri'"):
        build_table("similarity", frame, dataset="veri")


# ---- the paper's numbers live in study/paper.py only ---------------------------------------------------

def test_paper_numbers_appear_in_no_other_module():
    numbers = {f"{ref.value:.1f}" for refs in (PAPER.past_positives, PAPER.similarity, PAPER.backbone)
               for ref in refs.values()}
    assert "83.3" in numbers and len(numbers) >= 12
    pattern = re.compile(r"(?<![\d.])(" + "|".join(re.escape(n) for n in sorted(numbers)) + r")(?![\d])")
    offenders = []
    for path in sorted((ROOT / "study").rglob("*.py")):
        if path.name == "paper.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, offenders


def test_paper_values_match_the_supplementary():
    """Transcribed by hand from the supplementary (sections B-E), as an independent check of paper.py."""
    c = {(0.995, True): 80.6, (0.997, True): 80.7, (0.999, True): 81.3,
         (0.995, False): 82.4, (0.997, False): 83.3, (0.999, False): 83.0}
    d = {("triplet", None): 79.4, ("he", "cosine"): 82.9, ("he", "euclidean"): 83.3}
    e = {(False, False, False): (77.7, 80.2), (False, True, True): (79.4, 83.2), (True, False, True): (78.6, 82.1),
         (True, True, False): (78.7, 82.8), (True, True, True): (79.7, 83.3)}
    assert {k: r.value for k, r in PAPER.past_positives.items()} == c
    assert {k: r.value for k, r in PAPER.similarity.items()} == d
    assert {k: r.value for k, r in PAPER.backbone.items()} == {
        (*combo, loss): value for combo, pair in e.items() for loss, value in zip(("triplet", "he"), pair)}
    assert {r.source for r in PAPER.backbone.values()} == {"supplementary E"}
    assert dict(PAPER.npair_optimum.params) == {"loss.k": 15}
    assert dict(PAPER.ranked_list_optimum.params) == {"loss.alpha": 1.2, "loss.beta": 0.4}
    assert (PAPER.dataset, PAPER.metric) == ("veri776", "mAP")


# ---- rendering -----------------------------------------------------------------------------------------

def _demo_frame(tmp_path: Path):
    rows = (seeds("he", [80.0, 82.0, 84.0], {**VERI, **HE_MOREID})
            + [trial("t", 70.5, {**VERI, "loss.name": "triplet", "framework.name": "moreid"})])
    return load_results(write_study(tmp_path / "demo", rows))


def test_markdown_csv_and_latex(tmp_path):
    frame = _demo_frame(tmp_path)
    tables = [build_table("similarity", frame), build_table("loss_comparison", frame)]
    md = render(tables, "md", "# header")
    assert md.startswith("# header\n")
    assert "| Loss | Distance | mAP: VeRi-776 (paper) | mAP: ours (VeRi-776) | mAP: Δ |" in md
    assert "| HE | euclidean | 83.3 | 82.00 ± 2.00 (n=3) | -1.30 |" in md
    assert "| Triplet | any | 79.4 | 70.50 | -8.90 |" in md
    assert "| HE | cosine | 82.9 | — | — |" in md
    assert "| N-pair | Baseline | — | — | — | — | — | — |" in md

    lines = list(csv.DictReader(io.StringIO(render(tables, "csv"))))
    assert set(lines[0]) == {"table", "dataset", "row", "column", "reference", "ours_mean", "ours_std", "n",
                             "diff", "note"}
    he = next(r for r in lines if r["table"] == "similarity" and r["row"] == "HE / euclidean")
    assert (he["reference"], he["ours_mean"], he["ours_std"], he["n"], he["diff"]) == ("83.3", "82", "2", "3", "-1.3")
    cosine = next(r for r in lines if r["table"] == "similarity" and r["row"] == "HE / cosine")
    assert (cosine["ours_mean"], cosine["n"], cosine["diff"]) == ("", "", "")
    assert len([r for r in lines if r["table"] == "loss_comparison"]) == 16

    tex = render(tables, "latex")
    assert tex.count(r"\begin{tabular}") == 2 and tex.count(r"\end{table}") == 2
    assert r"82.00 $\pm$ 2.00 (n=3)" in tex and r"$\Delta$" in tex and "---" in tex
    assert r"\multicolumn{3}{c}{mAP}" in tex
    assert "%" not in tex.replace(r"\%", "")  # every percent sign escaped
    with pytest.raises(ValueError, match="known formats: md, csv, latex"):
        render(tables, "html")


# ---- results.md and plots -------------------------------------------------------------------------------

def _sweep_rows(data: dict | None = None) -> list[dict]:
    """Trials of every plotted sweep, on ``data`` (default: the synthetic dataset)."""
    rows = []
    for m in (0.995, 0.997, 0.999):
        for include in (True, False):
            rows += seeds(f"p{m}{include}", [60.0 + 100 * (m - 0.99) + (0 if include else 2), 61.0],
                          {**HE_MOREID, "framework.momentum": m, "framework.include_past_positives": include})
    for k in (5, 15):
        for fw in ("baseline", "moreid"):
            rows.append(trial(f"k{k}{fw}", 40.0 + k, {"loss.name": "npair", "loss.k": k, "framework.name": fw}))
    for a, b in ((1.0, 0.2), (1.2, 0.4), (1.4, 0.4)):
        rows.append(trial(f"r{a}{b}", 30.0 + 10 * a * b, {"loss.name": "ranked_list", "loss.alpha": a,
                                                          "loss.beta": b}))
    for size in (256, 1024, 4096):
        rows.append(trial(f"d{size}", 50.0 + size / 1024, {"loss.name": "triplet", "framework.dict_size": size}))
    rows.append(trial("err", None, {"loss.name": "he"}, status="ERROR"))
    for row in rows:
        row.update(data or {})
    return rows


def test_write_report_writes_every_table_and_valid_pngs(tmp_path):
    study = write_study(tmp_path / "study", _sweep_rows(VERI))
    out = write_report(study)
    assert out == study / "results.md"
    text = out.read_text()
    assert "- Study `s`" in text and "1 ERROR" in text and "Datasets: VeRi-776" in text
    for title in ("Past positives (supplementary C)", "N-pair loss: mAP against k", "Ranked List loss",
                  "MoReID: mAP against dictionary size", "Loss x framework"):
        assert title in text
    expected = {"past_positives", "npair_k", "ranked_list", "dictionary_size", "cmc"}
    plots = {p.stem: p for p in (study / "plots").glob("*.png")}
    assert set(plots) == expected
    for path in plots.values():
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        assert f"](plots/{path.name})" in text
    # The same trials on synthetic data (the demo) stay out of the paper's ablation plots.
    demo = write_study(tmp_path / "demo", _sweep_rows())
    text = write_report(demo).read_text()
    assert "Datasets: synthetic" in text and "Past positives (supplementary C)" in text
    assert {p.stem for p in (demo / "plots").glob("*.png")} == {"cmc"}


def test_write_report_with_no_counted_trial_still_writes(tmp_path):
    study = write_study(tmp_path / "s", [trial("e", None, status="ERROR"), trial("r", None, status="RUNNING")])
    out = write_report([study], out=tmp_path / "elsewhere" / "report.md", plots_dir=tmp_path / "p")
    text = out.read_text()
    assert "No counted trial matches a table yet." in text and "1 ERROR, 1 RUNNING" not in text
    assert "2 trial(s): 1 RUNNING, 1 ERROR" in text
    assert not list((tmp_path / "p").glob("*.png"))


def test_write_plots_names_files_per_dataset_when_several(tmp_path):
    rows = [trial(f"{d}{m}", 50.0, {"data.dataset": d, **HE_MOREID, "framework.momentum": m})
            for d in ("veri776", "market1501") for m in (0.995, 0.999)]
    frame = load_results(write_study(tmp_path / "s", rows))
    written = write_plots(build_tables("past_positives", frame), frame, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["cmc.png", "past_positives_market1501.png",
                                               "past_positives_veri776.png"]


# ---- the column contract and bad input ------------------------------------------------------------------

def test_full_column_contract_is_read_with_types(tmp_path):
    """A results.csv with exactly the documented columns, booleans written in lower case."""
    assert HEADER[:3] == ["study", "trial_id", "status"] and HEADER[-len(flatten(Config())):] == list(flatten(Config()))
    rows = [trial("t", 77.0, {**VERI, **HE_MOREID, "data.autoaug": True, "model.ibn": True,
                              "model.non_local": True})]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HEADER)
    writer.writeheader()
    writer.writerows(rows)
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "results.csv").write_text(buffer.getvalue().replace("True", "true").replace("False", "false"))
    frame = load_results(folder)
    assert list(frame.columns[:len(HEADER)]) == HEADER
    row = frame.iloc[0]
    assert row["data.autoaug"] is True and row["framework.include_past_positives"] is False
    assert row["framework.momentum"] == 0.997 and row["loss.k"] == 15 and row["data.dataset"] == "veri776"
    assert row["best_mAP"] == 77.0 and json.loads(row["cmc"])[0] == 87.0
    table = build_table("backbone", frame)
    assert table.cell(("✓", "✓", "✓"), "HE").diff == pytest.approx(77.0 - 83.3)
    assert all(build_tables(name, frame) for name in TABLE_NAMES)


def test_bad_results_files_are_named(tmp_path):
    with pytest.raises(ResultsError, match=r"study folder .*empty has no results.csv"):
        load_results((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(ResultsError, match="study folder not found"):
        load_results(tmp_path / "nowhere")
    write_study(tmp_path / "short", [trial("t", 1.0)], header=[h for h in HEADER if h != "best_R5"])
    with pytest.raises(ResultsError, match=r"short/results.csv lacks the column\(s\) best_R5"):
        load_results(tmp_path / "short")
    bad = trial("t", 1.0)
    bad["model.ibn"] = "maybe"
    write_study(tmp_path / "bad", [bad])
    with pytest.raises(ResultsError, match="column model.ibn holds 'maybe'"):
        load_results(tmp_path / "bad")


# ---- the command line -----------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.results", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_happy_path(tmp_path):
    study = write_study(tmp_path / "study", _sweep_rows(VERI))
    out = tmp_path / "c.csv"
    done = _cli(str(study), "--table", "past_positives", "--format", "csv", "--out", str(out),
                "--plots", str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    lines = list(csv.DictReader(out.open()))
    cell = next(r for r in lines if r["row"] == "✓" and r["column"] == "m = 0.995")
    assert (cell["reference"], cell["ours_mean"], cell["n"]) == ("80.6", "60.75", "2")
    assert (tmp_path / "plots" / "past_positives.png").read_bytes()[:8] == PNG_MAGIC
    done = _cli(str(study), "--format", "md")
    assert done.returncode == 0 and done.stdout.startswith("# Study results")
    assert "## N-pair loss" in done.stdout


def test_cli_errors_exit_2_without_traceback(tmp_path):
    (tmp_path / "nothing").mkdir()
    done = _cli(str(tmp_path / "nothing"))
    assert done.returncode == 2 and "has no results.csv" in done.stderr and str(tmp_path / "nothing") in done.stderr
    assert "Traceback" not in done.stderr
    study = write_study(tmp_path / "s", [trial("t", 1.0)])
    done = _cli(str(study), "--table", "losses")
    assert done.returncode == 2 and "unknown table 'losses'" in done.stderr
    assert all(name in done.stderr for name in TABLE_NAMES) and "Traceback" not in done.stderr


# ---- directions: the paper's claims with a Welch interval and a verdict ----------------------------------

def _claim_rows(he: list[float], tri: list[float], *, dataset: str = "synthetic") -> list[dict]:
    """MoReID HE (euclidean) and MoReID Triplet seeds on ``dataset``, plus one baseline HE trial."""
    data = {"data.dataset": dataset}
    return (seeds("he", he, {**data, **HE_MOREID})
            + seeds("tri", tri, {**data, "loss.name": "triplet", "framework.name": "moreid"})
            + [trial("bhe", 50.0, {**data, "loss.name": "he", "framework.name": "baseline"})])


def _welch_by_hand(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Welch–Satterthwaite written out: (low, high, two-sided p), with only SciPy's t distribution."""
    from scipy.stats import t as student
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff = a.mean() - b.mean()
    half = student.ppf(0.5 + confidence / 2, df) * se
    return diff - half, diff + half, 2 * student.sf(abs(diff) / se, df)


def test_welch_interval_and_p_value_match_a_hand_written_formula_and_textbook_values():
    from study.results.directions import welch, welch_interval
    # Unequal sizes and variances (the case Welch's correction exists for).
    a, b = [27.3, 23.5, 31.1, 29.9], [33.4, 32.3, 31.2, 36.7, 35.0]
    test = welch(a, b)
    low, high, p = _welch_by_hand(a, b)
    assert (test.low, test.high, test.p_value) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12),
                                                   pytest.approx(p, rel=1e-10))
    assert test.diff == pytest.approx(np.mean(a) - np.mean(b))
    # Equal n and variances: Welch's df is 2(n - 1) = 4 and the half-width t(0.975, 4) * sqrt(2 s^2 / n) with the
    # tabled t = 2.7764; t = 1 / sqrt(2/3) = 1.2247 on 4 df has the tabled two-sided p = 0.2879.
    low, high = welch_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    half = 2.7764 * math.sqrt(2 / 3)
    assert (low, high) == (pytest.approx(1 - half, abs=1e-3), pytest.approx(1 + half, abs=1e-3))
    equal = welch([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert equal.df == pytest.approx(4.0) and equal.p_value == pytest.approx(0.2879, abs=1e-4)
    # The per-claim verdict and the test agree: the 95 % interval excludes 0 exactly when p < 0.05.
    for shift in (0.5, 1.5, 2.0, 2.5, 3.0, 4.0):
        test = welch([v + shift for v in (1.0, 2.0, 3.0)], [0.0, 1.0, 2.0])
        assert (test.low > 0) == (test.p_value < 0.05), shift
    # No spread on either side: the difference itself, and p 0 (differing means) or 1 (equal ones).
    assert welch_interval([2.0, 2.0], [1.0, 1.0]) == (1.0, 1.0)
    assert (welch([2.0, 2.0], [1.0, 1.0]).p_value, welch([1.0, 1.0], [1.0, 1.0]).p_value) == (0.0, 1.0)
    with pytest.raises(ValueError, match="at least 2 values per side"):
        welch_interval([1.0], [1.0, 2.0])


def test_holm_adjustment_on_a_known_example():
    from study.results.directions import holm, holm_verdict
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.06.
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # At family-wise 0.05 Holm rejects the two smallest (0.005 <= 0.05/4, 0.01 <= 0.05/3) and stops at
    # 0.03 > 0.05/2, although 0.03 and 0.04 are below 0.05 alone.
    assert [a <= 0.05 for a in adjusted] == [True, False, False, True]
    assert holm([0.2, 0.6]) == pytest.approx([0.4, 0.6]) and holm([0.9, 0.3]) == pytest.approx([0.9, 0.6])
    assert holm([]) == [] and holm([0.03]) == [0.03]
    assert holm([0.5, 0.5, 0.5]) == [1.0, 1.0, 1.0]  # capped at 1
    with pytest.raises(ValueError, match="p-values must lie in"):
        holm([0.1, 1.5])
    assert (holm_verdict(+2.0, 0.02), holm_verdict(-2.0, 0.02), holm_verdict(-2.0, 0.06)) == (
        "reproduced", "contradicted", "inconclusive")
    assert holm_verdict(None, None) == "inconclusive"


def test_directions_verdicts_reproduced_contradicted_inconclusive(tmp_path):
    from study.results.directions import build_directions
    cases = {"up": ([60.0, 61.0, 62.0], [50.0, 51.0, 52.0], "reproduced"),
             "down": ([40.0, 41.0, 42.0], [50.0, 51.0, 52.0], "contradicted"),
             "flat": ([49.0, 51.0, 53.0], [50.0, 52.0, 48.0], "inconclusive")}
    for name, (he, tri, expected) in cases.items():
        frame = load_results(write_study(tmp_path / name, _claim_rows(he, tri)))
        (table,) = build_directions(frame)
        row = next(r for r in table.rows if r.claim.name == "HE beats Triplet (MoReID)")
        assert row.verdict == expected, name
        assert row.diff == pytest.approx(np.mean(he) - np.mean(tri))
        assert row.interval[0] < row.diff < row.interval[1] or row.interval[0] == row.interval[1]
        # The paper's difference comes from study/paper.py (supplementary D: HE euclidean - Triplet).
        assert row.claim.paper_diff == pytest.approx(PAPER.similarity[("he", "euclidean")].value
                                                     - PAPER.similarity[("triplet", None)].value)
        # One baseline HE trial: the claim appears, without an interval (n = 1), inconclusive.
        framework = next(r for r in table.rows if r.claim.name == "MoReID beats baseline (HE)")
        assert (framework.worse.n, framework.interval, framework.verdict) == (1, None, "inconclusive")
        assert framework.claim.paper_diff is None
        # Claims without trials on both sides are left out.
        assert not any("N-pair" in r.claim.name or "cosine" in r.claim.name for r in table.rows)


def test_directions_past_positives_uses_the_paper_cell_at_the_nearest_momentum(tmp_path):
    from study.results.directions import build_directions
    base = {**HE_MOREID, "framework.momentum": 0.9}
    rows = (seeds("neg", [55.0, 56.0, 57.0], base)
            + seeds("pp", [45.0, 47.0, 46.0], {**base, "framework.include_past_positives": True})
            + seeds("cos", [58.0, 60.0, 59.0], {**base, "loss.distance": "cosine", "loss.normalize": True}))
    (table,) = build_directions(load_results(write_study(tmp_path / "s", rows)))
    past = next(r for r in table.rows if r.claim.name.startswith("Negatives only"))
    assert "m = 0.9" in past.claim.name and past.verdict == "reproduced"
    assert "0.995" in past.claim.paper_cells
    assert past.claim.paper_diff == pytest.approx(PAPER.past_positives[(0.995, False)].value
                                                  - PAPER.past_positives[(0.995, True)].value)
    cosine = next(r for r in table.rows if "cosine" in r.claim.name)
    assert cosine.verdict == "contradicted" and cosine.diff == pytest.approx(-3.0)


def test_directions_cli_csv_and_markdown_and_results_md(tmp_path):
    study = write_study(tmp_path / "study", _claim_rows([60.0, 61.0, 62.0], [50.0, 51.0, 52.0]))
    out = tmp_path / "d.csv"
    done = _cli(str(study), "--table", "directions", "--format", "csv", "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = list(csv.DictReader(out.open()))
    assert {"claim", "verdict", "paper_diff", "ci_low", "ci_high"} <= set(lines[0])
    row = next(r for r in lines if r["claim"] == "HE beats Triplet (MoReID)")
    assert (row["verdict"], row["better_mean"], row["worse_n"], row["diff"]) == ("reproduced", "61", "3", "10")
    done = _cli(str(study), "--table", "directions")
    assert done.returncode == 0 and "| HE beats Triplet (MoReID) |" in done.stdout and "reproduced" in done.stdout
    assert "Directions: the paper's claims" in write_report(study).read_text()
    done = _cli(str(study), "--table", "directions", "--format", "latex")
    assert done.returncode == 2 and "md or csv" in done.stderr and "Traceback" not in done.stderr
    # A study without the cells of any claim: no directions section in results.md.
    lonely = write_study(tmp_path / "lonely", [trial("t", 50.0, HE_MOREID)])
    assert "Directions" not in write_report(lonely).read_text()
def test_cmc_legend_names_framework_and_loss_and_disambiguates_keys():
    from study.results.plots import _labels

    labels = _labels([{"framework.name": "baseline", "loss.name": "he", "loss.normalize": False},
                      {"framework.name": "moreid", "loss.name": "ranked_list", "loss.normalize": True}])
    assert labels == ["Baseline + HE, normalize=False", "MoReID + Ranked List (untuned α/β), normalize=True"]
    both = _labels([{"optim.lr": 0.001, "data.height": 64, "model.height": 3},
                    {"optim.lr": 0.003, "data.height": 32, "model.height": 4}])
    assert both[0] == "lr=0.001, data.height=64, model.height=3"  # two keys end in "height": full names
    # a key only some configurations have, all with one value, is implied by their loss: not repeated
    implied = _labels([{"framework.name": "moreid", "loss.name": "npair", "loss.k": 15, "eval.metric": "euclidean"},
                       {"framework.name": "moreid", "loss.name": "he", "eval.metric": "cosine"},
                       {"framework.name": "baseline", "loss.name": "npair", "loss.k": 15, "eval.metric": "euclidean"}])
    assert implied == ["MoReID + N-pair, metric=euclidean", "MoReID + HE, metric=cosine", "Baseline + N-pair, metric=euclidean"]
    searched = _labels([{"optim.lr": 0.00392237}, {"optim.lr": 2.9332e-05}])
    assert searched == ["lr=0.00392", "lr=2.93e-05"]  # three significant digits, not a sampled float's six
    long = _labels([{"framework.name": "moreid", **{f"loss.knob{i}": i for i in range(12)}},
                    {"framework.name": "baseline", **{f"loss.knob{i}": i + 1 for i in range(12)}}])
    assert all(len(line.rstrip(",")) <= 60 for label in long for line in label.split("\n"))  # wrapped, not cut
    assert long[0].replace(",\n", ", ").endswith("knob11=11")


# ---- directions: p-values, Holm's correction, untuned Ranked List, regimes side by side -----------------

def _many_claims(he: list[float], tri: list[float], rl: list[float], npair: list[float], *, study: str = "s",
                 dataset: str = "synthetic") -> list[dict]:
    """MoReID HE against MoReID Triplet, Ranked List and N-pair (three claims), seeds given per cell."""
    data = {"data.dataset": dataset}
    return (seeds("he", he, {**data, **HE_MOREID}, study=study)
            + seeds("tri", tri, {**data, "loss.name": "triplet", "framework.name": "moreid"}, study=study)
            + seeds("rl", rl, {**data, "loss.name": "ranked_list", "framework.name": "moreid"}, study=study)
            + seeds("np", npair, {**data, "loss.name": "npair", "framework.name": "moreid"}, study=study))


def test_directions_give_p_values_and_holm_verdicts_that_can_differ_from_the_per_claim_ones(tmp_path):
    from study.results.directions import build_directions, holm, render_directions, welch
    he, tri, rl, npair = [50.0, 52.0, 54.0], [40.0, 41.0, 42.0], [45.0, 47.0, 49.0], [49.0, 51.5, 53.0]
    (table,) = build_directions(load_results(write_study(tmp_path / "s", _many_claims(he, tri, rl, npair))))
    rows = {r.claim.name: r for r in table.rows}
    assert set(rows) == {"HE beats Triplet (MoReID)", "HE beats Ranked List (MoReID)", "HE beats N-pair (MoReID)"}
    expected = {name: welch(he, other).p_value for name, other in (("HE beats Triplet (MoReID)", tri),
                                                                  ("HE beats Ranked List (MoReID)", rl),
                                                                  ("HE beats N-pair (MoReID)", npair))}
    adjusted = dict(zip(expected, holm(list(expected.values()))))
    for name, row in rows.items():
        assert row.p_value == pytest.approx(expected[name]) and row.p_holm == pytest.approx(adjusted[name])
    # Ranked List: p between 0.05 / 2 and 0.05, so reproduced alone but not after Holm over three claims.
    ranked = rows["HE beats Ranked List (MoReID)"]
    assert 0.025 < ranked.p_value < 0.05 and ranked.verdict == "reproduced"
    assert ranked.verdict_holm == "inconclusive"
    assert (rows["HE beats Triplet (MoReID)"].verdict, rows["HE beats Triplet (MoReID)"].verdict_holm) == (
        "reproduced", "reproduced")
    assert rows["HE beats N-pair (MoReID)"].verdict_holm == "inconclusive"
    lines = list(csv.DictReader(io.StringIO(render_directions([table], "csv"))))
    line = next(r for r in lines if r["claim"] == "HE beats Ranked List (MoReID)")
    assert float(line["p_value"]) == pytest.approx(ranked.p_value, rel=1e-3)
    assert float(line["p_holm"]) == pytest.approx(ranked.p_holm, rel=1e-3)
    assert (line["verdict"], line["verdict_holm"]) == ("reproduced", "inconclusive")
    md = render_directions([table], "md")
    assert "| p | Verdict | Holm |" in md and "over this table's 3 tested claim(s)" in md
    md_row = next(line for line in md.splitlines() if line.startswith("| HE beats Ranked List (MoReID) |"))
    assert f"| {ranked.p_value:.3f} | reproduced [1] | inconclusive ({ranked.p_holm:.3f}) |" in md_row


def test_ranked_list_is_marked_untuned_in_every_table_claim_legend_and_summary(tmp_path):
    from study.results.directions import build_directions, render_directions
    from study.results.summary import closing_summary
    rows = _many_claims([50.0, 52.0, 54.0], [40.0, 41.0, 42.0], [30.0, 31.0, 32.0], [49.0, 51.5, 53.0])
    frame = load_results(write_study(tmp_path / "s", rows))
    (directions,) = build_directions(frame)
    ranked = next(r for r in directions.rows if "Ranked List" in r.claim.name)
    assert ranked.worse.label == "MoReID Ranked List (untuned α/β)"
    assert any("not chosen on a validation split" in note for note in ranked.notes)
    others = [r for r in directions.rows if "Ranked List" not in r.claim.name]
    assert others and not any("untuned" in r.worse.label or "validation" in r.note for r in others)
    md = render_directions([directions], "md")
    assert "MoReID Ranked List (untuned α/β): 31.00 ± 1.00 (n=3)" in md
    assert md.count("not chosen on a validation split") == 1  # one footnote, however many rows cite it
    table = build_table("loss_comparison", frame)
    assert table.cell(("Ranked List (untuned α/β)", "MoReID"), "mAP").mean == 31.0
    assert any("not chosen on a validation split" in note for note in table.notes)
    assert any("read on the test split" in note for note in build_table("ranked_list", frame).notes)
    # The closing summary marks a Ranked List cell, and only it.
    summary = closing_summary(frame.assign(**{"best_mAP": frame["best_mAP"].where(
        frame["loss.name"] != "ranked_list", 99.0)}), ["loss.name", "train.seed"])
    assert summary[0].startswith("winner: loss.name=ranked_list (untuned α/β): mAP 99.00")
    assert summary[1].startswith("runner-up: loss.name=he: mAP 52.00")


def test_two_regimes_side_by_side_claim_by_claim_md_and_csv(tmp_path):
    random_init = write_study(tmp_path / "fidelity", _many_claims(
        [30.0, 31.0, 32.0], [36.0, 37.0, 38.0], [10.0, 12.0, 14.0], [39.0, 40.0, 41.0], study="fidelity"))
    pretrained = write_study(tmp_path / "fidelity_pretrained", _many_claims(
        [80.0, 81.0, 82.0], [76.0, 77.0, 78.0], [70.0, 71.0, 72.0], [79.0, 80.5, 82.0], study="fidelity_pretrained")
        # a claim only this regime tests: MoReID beats the baseline with HE
        + seeds("bhe", [78.0, 79.0, 80.0], {"data.dataset": "synthetic", "loss.name": "he",
                                            "framework.name": "baseline"}, study="fidelity_pretrained"))
    out = tmp_path / "side.md"
    done = _cli(str(random_init), str(pretrained), "--table", "directions", "--out", str(out))
    assert done.returncode == 0, done.stderr
    md = out.read_text()
    assert "## Directions by regime: fidelity vs fidelity_pretrained (ours on synthetic)" in md
    assert "| Claim | Paper Δ | fidelity: Δ | fidelity: 95 % interval | fidelity: verdict | fidelity: Holm |" in md
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in md.splitlines()
            if line.startswith("| HE beats") or line.startswith("| MoReID beats")}
    triplet = rows["HE beats Triplet (MoReID)"]
    half = 2.7764 * math.sqrt(2 / 3)  # both sides sd 1, n 3: Welch's df 4, tabled t(0.975, 4)
    assert triplet[2:4] == ["-6.00", f"[{-6 - half:+.2f}, {-6 + half:+.2f}]"] and triplet[4] == "contradicted"
    assert triplet[6:8] == ["+4.00", f"[{4 - half:+.2f}, {4 + half:+.2f}]"] and triplet[8] == "reproduced"
    assert triplet[-1] == "yes |"
    assert rows["HE beats Ranked List (MoReID)"][4].startswith("reproduced")
    assert rows["HE beats Ranked List (MoReID)"][-1] == "no |"
    framework = rows["MoReID beats baseline (HE)"]
    assert framework[2:6] == ["—"] * 4 and framework[6] == "+2.00" and framework[-1] == "— |"
    assert "MoReID Ranked List (untuned α/β)" in md
    done = _cli(str(random_init), str(pretrained), "--table", "directions", "--format", "csv")
    assert done.returncode == 0, done.stderr
    lines = list(csv.DictReader(io.StringIO(done.stdout)))
    assert list(lines[0])[:2] == ["regime", "claim"] and {"p_value", "p_holm", "verdict_holm"} <= set(lines[0])
    by = {(r["regime"], r["claim"]): r for r in lines}
    assert len(lines) == 3 + 4  # three claims in the random-init regime, four in the pretrained one
    old, new = by[("fidelity", "HE beats Triplet (MoReID)")], by[("fidelity_pretrained", "HE beats Triplet (MoReID)")]
    assert (old["diff"], old["verdict"], new["diff"], new["verdict"]) == ("-6", "contradicted", "4", "reproduced")
    assert (old["better_mean"], old["worse_mean"], new["better_n"]) == ("31", "37", "3")
    # --pooled reads both folders as one regime: the old single table, with both studies' trials together.
    done = _cli(str(random_init), str(pretrained), "--table", "directions", "--format", "csv", "--pooled")
    pooled = {r["claim"]: r for r in csv.DictReader(io.StringIO(done.stdout))}
    assert done.returncode == 0 and "regime" not in next(iter(pooled.values()))
    assert pooled["HE beats Triplet (MoReID)"]["better_n"] == "6"
    # The same folder twice is one regime: the plain table.
    done = _cli(str(random_init), str(random_init / "results.csv"), "--table", "directions")
    assert done.returncode == 0 and "Directions: the paper's claims" in done.stdout


def test_regimes_label_by_folder_when_study_names_repeat(tmp_path):
    from study.results.regimes import build_regimes, regime_label, unique_labels
    a = load_results(write_study(tmp_path / "a", _claim_rows([60.0, 61.0, 62.0], [50.0, 51.0, 52.0])))
    b = load_results(write_study(tmp_path / "b", _claim_rows([40.0, 41.0, 42.0], [50.0, 51.0, 52.0])))
    labels = unique_labels([regime_label(a, "a"), regime_label(b, "b")], ["a", "b"])
    assert labels == ["a", "b"]  # both studies are named "s"
    (comparison,) = build_regimes([a, b], labels)
    claim = next(c for c in comparison.claims if c.name == "HE beats Triplet (MoReID)")
    assert [r.verdict for r in claim.by_regime] == ["reproduced", "contradicted"] and claim.changes
    with pytest.raises(ResultsError, match="at least 2 regimes"):
        build_regimes([a], ["a"])
