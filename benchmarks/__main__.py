"""Run the benchmarks: ``python -m benchmarks [--quick] [--only NAME ...]``.

Each topic module exposes ``run(quick: bool) -> dict[str, float]``; it prints its own table and returns
its headline figures. The last line printed is one JSON object with every figure, the machine and the
targets of docs/benchmarks.md checked against them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
from datetime import date

TOPICS = ("losses", "step", "evaluation", "rerank", "data", "study", "scale", "preflight")

# name of the headline figure -> (comparison, target). Ratios are "cost over the floor" (lower is better)
# or "speedup over the reference" (higher is better).
TARGETS = {
    "loss_cost_over_distance": ("<=", 1.0),
    "loss_he_over_distance": ("<=", 1.0),  # issue 9: at most 1.0x, aim at 0.3x
    "moreid_step_over_baseline": ("<=", 1.45),
    "eval_speedup_vs_reference": (">=", 10.0),
    "eval_veriwild_2000_peak_gib": ("<=", 3.0),
    "rerank_market_speedup": (">=", 1.0),
    "rerank_veriwild_large_peak_gib": ("<=", 8.0),
    "trial_overhead_s": ("<=", 3.0),
    "callback_ms_per_result_100": ("<=", 50.0),
    "quickstart_train_share": (">=", 0.70),
    "quickstart_wall_min": ("<=", 5.0),
    "quickstart_min_gain_over_untrained": (">=", 2.0),  # every trial's best mAP over its untrained mAP
}


def _machine() -> dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    try:
        import os

        info["cores"] = str(os.cpu_count())
    except Exception:  # pragma: no cover - informational only
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    info["date"] = date.today().isoformat()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under 10 minutes on 2 cores")
    parser.add_argument("--only", nargs="+", choices=TOPICS, metavar="NAME",
                        help=f"run only these topics ({', '.join(TOPICS)})")
    args = parser.parse_args(argv)

    figures: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for topic in args.only or TOPICS:
        print(f"\n=== {topic} {'(quick)' if args.quick else ''}", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{topic}")
        figures.update(module.run(quick=args.quick))
        seconds[topic] = round(time.perf_counter() - start, 1)

    checks = {}
    for name, (op, target) in TARGETS.items():
        if name in figures:
            value = figures[name]
            checks[name] = {"value": value, "target": f"{op} {target}",
                            "met": value <= target if op == "<=" else value >= target}
    print("\n=== targets")
    for name, check in checks.items():
        print(f"{name:32s} {check['value']:10.3f}  target {check['target']:8s} {'met' if check['met'] else 'MISSED'}")
    summary = {**figures, "targets": checks, "seconds": seconds, "machine": _machine(), "quick": args.quick}
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
