"""``python -m benchmarks.gpu --device cpu --quick``: the GPU benchmark's code at toy sizes, so it cannot rot
before a GPU is lent. It must run where only PyTorch is installed (no Ray, Optuna, pandas or the study
package): the run below makes those unimportable first."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu import FULL, QUICK_RECIPES, Row, config_has, missing_keys, planned_rows

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("ray", "optuna", "pandas", "study")
# Stand-in for a machine without them: a None entry in sys.modules makes `import name` raise ImportError.
SHIM = (f"import sys, runpy\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        f"sys.argv = ['benchmarks.gpu', '--device', 'cpu', '--quick']\n"
        f"try:\n"
        f"    runpy.run_module('benchmarks.gpu', run_name='__main__')\n"
        f"except SystemExit as exit:\n"
        f"    assert exit.code in (0, None), exit.code\n")

_RUN: dict = {}


def _quick_run() -> tuple[dict, str]:
    """(the JSON summary, the whole output) of one quick CPU run, shared by the tests of this file."""
    if not _RUN:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
        out = subprocess.run([sys.executable, "-c", SHIM], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=540)
        assert out.returncode == 0, (f"benchmarks.gpu --device cpu --quick failed:\n{out.stdout[-3000:]}\n"
                                     f"{out.stderr[-3000:]}")
        _RUN["summary"], _RUN["output"] = json.loads(out.stdout.strip().splitlines()[-1]), out.stdout
    return _RUN["summary"], _RUN["output"]


def _numbers(tree, path=""):
    """Every (path, number) in a JSON tree, booleans left out."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_quick_cpu_run_without_study_packages_gives_positive_finite_figures():
    summary, output = _quick_run()
    assert summary["device_type"] == "cpu" and summary["device"].startswith("cpu") and summary["quick"] is True
    bad = [(path, value) for path, value in _numbers(summary)
           if path != ".load_average" and not (math.isfinite(value) and value > 0)]
    assert not bad, f"figures that are not positive finite numbers: {bad}"
    for key in ("fp32_flops_per_s", "fp16_flops_per_s", "bf16_flops_per_s", "copy_bytes_per_s"):
        assert key in summary["peaks"]
    # The readable table comes before the JSON line, one section after another.
    order = [output.index(s) for s in ("peaks:", "training step (TrainStep)", "MoReID step parts", "evaluation,",
                                       "re-ranking", "training step, compiled")]
    assert order == sorted(order)


def test_quick_step_rows_cover_the_planned_grid_and_only_what_this_build_supports():
    summary, output = _quick_run()
    rows = summary["step"]
    figures = ("images_per_s", "step_ms", "peak_memory_gib", "gflops_per_step", "floor_ms", "achieved_fraction")
    for row in rows:
        assert all(key in row for key in figures), row
        assert math.isclose(row["images_per_s"] * row["step_ms"] / 1e3, row["batch"], rel_tol=1e-9)
        assert math.isclose(row["achieved_fraction"], row["floor_ms"] / row["step_ms"], rel_tol=1e-9)
    eager = {(r["recipe"], r["framework"], r["precision"], r["channels_last"]) for r in rows if not r["compiled"]}
    precisions = ["fp32", "fp16"] + (["bf16"] if config_has("train.amp_dtype") else [])
    expected = {("veri776", fw, p, True) for fw in ("baseline", "moreid") for p in precisions}
    expected |= {("market1501", fw, "fp32", True) for fw in ("baseline", "moreid")}
    expected.add(("veri776", "moreid", precisions[-1], False))  # channels_last toggled off
    assert eager == expected
    # Rows the build cannot run are printed as such and never given a number.
    if not config_has("train.amp_dtype"):
        assert "bf16" not in {r["precision"] for r in rows}
        assert "not supported by this build (no train.amp_dtype)" in output
    if not config_has("train.compile"):
        assert not any(r["compiled"] for r in rows)
        assert "not supported by this build (no train.compile)" in output
    # The same model FLOPs for every precision and layout of one recipe and framework; MoReID adds f_k's forward.
    flops = {(r["recipe"], r["framework"]): r["gflops_per_step"] for r in rows}
    for r in rows:
        assert r["gflops_per_step"] == flops[(r["recipe"], r["framework"])]
    for recipe in QUICK_RECIPES:
        assert flops[(recipe, "moreid")] > flops[(recipe, "baseline")]


def test_quick_parts_evaluation_and_rerank_are_reported():
    summary, _ = _quick_run()
    parts = {(p["part"], p["dict_size"]) for p in summary["step_parts"]}
    sizes = sorted({s for _, s in parts})
    assert len(sizes) == 2
    assert parts == {(name, s) for name in ("fk_forward", "distances_he", "enqueue", "momentum_update") for s in sizes}
    he = {p["dict_size"]: p["gflops"] for p in summary["step_parts"] if p["part"] == "distances_he"}
    assert he[sizes[1]] > he[sizes[0]]  # the distance work grows with the dictionary
    for name in ("evaluation", "rerank"):
        result = summary[name]
        assert 0 < result["mAP"] <= 1 and result["seconds"] > 0 and result["floor_ms"] > 0


def test_full_plan_is_the_documented_subset_of_the_cross_product():
    eager, compiled = planned_rows(FULL.recipes, FULL.grid)
    toggle = "bf16" if config_has("train.amp_dtype") else "fp16"
    expected = {Row(r, fw, p, True, False) for r in ("veri776", "market1501") for fw in ("baseline", "moreid")
                for p in ("fp32", "fp16", "bf16")}
    expected |= {Row(r, "moreid", toggle, False, False) for r in ("veri776", "market1501")}
    assert set(eager) == expected and len(eager) == 14
    assert compiled == [Row(r, "moreid", toggle, True, True) for r in ("veri776", "market1501")]
    assert missing_keys(Row("veri776", "baseline", "fp32", True, False)) == []
    assert ("train.amp_dtype" in missing_keys(Row("veri776", "moreid", "bf16", True, False))) \
        == (not config_has("train.amp_dtype"))
    assert config_has("train.amp") and not config_has("train.no_such_key")
