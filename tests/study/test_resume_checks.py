"""``--resume`` checks what it would read before reading it, through the real CLI (``python -m study.run`` in
a subprocess, Ray never imported): the study name follows a fresh start's rule (a YAML ``name: ../../x``
does not reach a study folder outside ``--storage``), and the study folder and the files a resume unpickles
(Tune's ``tuner.pkl``, the searcher's state, Tune's experiment state) must be this user's and writable by no
one else. A planted pickle is never loaded (it would create a marker file).

The same refusal on a real interrupted study's searcher state: tests/ray/test_optuna_record.py.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HANG_S = 90  # a hang, not slowness, on a loaded 2-core machine
SPACE = {"description": "test", "searcher": "grid", "scheduler": {"type": "none"},
         "base": {"data": {"dataset": "synthetic", "height": 32, "width": 16, "batch_size": 8, "num_instance": 4,
                           "workers": 0}, "model": {"arch": "resnet18"},
                  "train": {"epochs": 1, "iters_per_epoch": 1, "device": "cpu"}},
         "parameters": {"optim.lr": {"type": "grid", "values": [1e-4]}}}


def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI; (exit status, stdout, stderr without import-time lines). Fails if Ray was imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "study.run", *args], cwd=REPO,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, capture_output=True, text=True,
                          timeout=HANG_S)
    imports = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imports and not any(re.search(r"\|\s+ray(\.|$)", line) for line in imports), "Ray was imported"
    return proc.returncode, proc.stdout, "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("import time:"))


def one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


class Planted:
    """Unpickling this creates ``path`` (what a planted pickle's code could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _tree(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_resume_refuses_a_space_name_that_leaves_storage(tmp_path):
    storage = tmp_path / "a" / "b" / "studies"
    storage.mkdir(parents=True)
    victim = tmp_path / "a" / "x"  # <storage>/../../x
    victim.mkdir()
    (victim / "study.json").write_text(json.dumps({"space": {"name": "x"}, "overrides": []}))
    (victim / "results.csv").write_text("trial_id,status\n")
    before = _tree(victim)
    space = tmp_path / "escape.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "name": "../../x"}))
    start = time.time()
    code, out, err = cli(str(space), "--storage", str(storage), "--resume")
    one_error(code, err, str(space), "'../../x'", "name")
    print(f"refused in {time.time() - start:.1f} s")
    assert _tree(victim) == before and "resum" not in out
    # The same file for a fresh start is refused by the space's own check (the rule is one).
    code, _, err = cli(str(space), "--storage", str(storage))
    one_error(code, err, "'../../x'")
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["a", "b", "studies", "x", "study.json",
                                                                    "results.csv", "escape.yaml"])


def test_resume_refuses_pickles_another_user_could_have_written(tmp_path):
    storage = tmp_path / "studies"
    study = storage / "victim"
    study.mkdir(parents=True, mode=0o700)
    space = tmp_path / "victim.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "name": "victim"}))
    (study / "study.json").write_text(json.dumps({"space": {**SPACE, "name": "victim"}, "source": str(space),
                                                  "overrides": [], "resources": {}}))
    marker = tmp_path / "planted-code-ran"
    for name in ("tuner.pkl", "searcher-state-2026-01-01_00-00-00.pkl", "experiment_state-2026-01-01_00-00-00.json"):
        planted = study / name
        planted.write_bytes(pickle.dumps(Planted(marker)))
        planted.chmod(0o620)  # group-writable
        code, _, err = cli(str(space), "--storage", str(storage), "--resume")
        one_error(code, err, f"{planted} is writable by other users")
        planted.chmod(0o600)
    study.chmod(0o777)  # anyone could have replaced its files
    code, _, err = cli(str(space), "--storage", str(storage), "--resume")
    one_error(code, err, f"{study} is writable by other users")
    study.chmod(0o700)
    if os.geteuid() == 0:  # root can make a folder that another user owns
        os.chown(study / "tuner.pkl", 65534, 65534)
        code, _, err = cli(str(space), "--storage", str(storage), "--resume")
        one_error(code, err, f"{study / 'tuner.pkl'} belongs to another user")
    assert not marker.exists()
