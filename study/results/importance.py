"""Which hyperparameters mattered: Optuna's parameter importances per Optuna study (grid cell), appended
to ``results.md`` with a bar plot per study under ``plots/``.

Computed with Optuna's default evaluator (PED-ANOVA in Optuna 5: how differently each parameter is
distributed among the best trials than among all of them) over the COMPLETE trials of a study, when it
has at least :data:`MIN_COMPLETE` of them and a parameter that took more than one value among them.
Importances are fractions that add up to 1.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reid_core.files import write_atomic
from study.search.optuna_record import OptunaRecord

MIN_COMPLETE = 4


@dataclass
class StudyImportance:
    """One Optuna study's importances (``importances`` empty when ``reason`` says why none)."""

    study: str
    counts: dict[str, int]  # trials by Optuna state name
    importances: dict[str, float] = field(default_factory=dict)  # parameter -> fraction, largest first
    reason: str = ""


def study_importance(study: optuna.Study, min_complete: int = MIN_COMPLETE) -> StudyImportance:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    out = StudyImportance(study.study_name, counts)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    varied = {name for name in {p for t in complete for p in t.params}
              if len({repr(t.params.get(name)) for t in complete}) > 1}
    if len(complete) < min_complete:
        out.reason = f"{len(complete)} complete trial(s); importances need at least {min_complete}"
    elif not varied:
        out.reason = "no parameter took more than one value among the complete trials"
    else:
        out.importances = dict(optuna.importance.get_param_importances(study, params=sorted(varied)))
    return out


def importances(record: OptunaRecord) -> list[StudyImportance]:
    """Every Optuna study of ``record``, in cell order."""
    names = record.unique_names()
    return [study_importance(record.study(record.names.index(name))) for name in names]


def plot_importance(found: StudyImportance, path: Path) -> Path:
    """Horizontal bars, the most important parameter on top."""
    names = list(found.importances)[::-1]
    fig = Figure(figsize=(6.4, 1.2 + 0.35 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(names, [found.importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fraction, PED-ANOVA)")
    ax.set_xlim(0, 1)
    ax.set_title(f"Parameter importances: {found.study}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def markdown(found: list[StudyImportance], plots: dict[str, Path], relative_to: Path) -> str:
    lines = ["", "## Parameter importances (Optuna)", ""]
    for item in found:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(item.counts.items())) or "no trial"
        lines.append(f"### {item.study}")
        lines.append("")
        lines.append(f"Trials: {counts}.")
        lines.append("")
        if not item.importances:
            lines += [f"No importances: {item.reason}.", ""]
            continue
        lines += ["| parameter | importance |", "| --- | ---: |"]
        lines += [f"| `{name}` | {value:.3f} |" for name, value in item.importances.items()]
        if item.study in plots:
            rel = Path(os.path.relpath(plots[item.study], relative_to)).as_posix()
            lines += ["", f"![importances {item.study}]({rel})"]
        lines.append("")
    return "\n".join(lines)


def append_importances(record: OptunaRecord, results_md: str | Path) -> list[StudyImportance]:
    """Append the importances section to ``results_md`` (and its plots to ``plots/`` beside it)."""
    results_md = Path(results_md)
    found = importances(record)
    plots = {}
    for index, item in enumerate(found):
        if item.importances:
            stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", item.study).strip("_")
            plots[item.study] = plot_importance(item, results_md.parent / "plots" / f"importance_{index:02d}_{stem}.png")
    text = results_md.read_text(encoding="utf-8") if results_md.is_file() else ""
    text += markdown(found, plots, results_md.parent)
    write_atomic(results_md, lambda fh: fh.write(text.encode("utf-8")))
    return found
