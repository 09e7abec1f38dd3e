"""``python -m reid_core.train``: a tiny real run, resume + eval-only, and one-line errors with exit code 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reid_core.config import Config

REPO = Path(__file__).resolve().parents[2]
CPU_CONFIG = REPO / "configs" / "synthetic_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from reid_core.data import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("cli") / "data", "market1501", ids=16, cams=2,
                              images_per_id_cam=3, height=64, width=32, seed=1)


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reid_core.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _tiny_sets(root: Path, out: Path) -> list[str]:
    sets = {"data.root": root, "data.workers": 0, "data.batch_size": 16, "data.num_instance": 4,
            "train.epochs": 2, "train.iters_per_epoch": 2, "train.eval_period": 1, "train.output_dir": out,
            "framework.dict_size": 64}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def test_example_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        Config.from_yaml(path)
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {"veri776_moreid_he.yaml", "market1501_moreid_he.yaml", "synthetic_cpu.yaml"} <= names


def test_cli_trains_checkpoints_and_resumes_for_evaluation(tiny_root, tmp_path):
    out = tmp_path / "run"
    done = _train("--config", str(CPU_CONFIG), *_tiny_sets(tiny_root, out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.strip().startswith("model.arch") and "resnet18" in line for line in lines)  # summary
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    final = [line for line in lines if line.startswith("final ")]
    assert len(final) == 1 and "mAP=" in final[0] and "R1=" in final[0] and "epoch=2" in final[0]
    checkpoint = out / "checkpoints" / "checkpoint.pt"
    assert checkpoint.is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    again = _train("--config", str(CPU_CONFIG), *_tiny_sets(tiny_root, tmp_path / "eval"),
                   "--resume", str(out / "checkpoints"), "--eval-only")
    assert again.returncode == 0, again.stderr
    final_again = [line for line in again.stdout.splitlines() if line.startswith("final ")]
    # the same weights give the same evaluation
    metric = lambda line, key: next(p for p in line.split() if p.startswith(f"{key}="))  # noqa: E731
    assert metric(final_again[0], "mAP") == metric(final[0], "mAP")
    assert "starting at epoch 2" in again.stdout

    other = _train("--config", str(CPU_CONFIG), *_tiny_sets(tiny_root, tmp_path / "other"),
                   "--set", "model.arch=resnet34", "--resume", str(checkpoint), "--eval-only")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.startswith("error: checkpoint ") and "does not fit" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, words", [
    (["--set", "loss.bogus=1"], "loss.bogus"),
    (["--set", "framework.momentum=1.5"], "framework.momentum"),
    (["--set", "data.root=/nonexistent/moreid-data"], "/nonexistent/moreid-data"),
    (["--resume", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, extra, words):
    done = _train("--config", str(CPU_CONFIG), "--set", f"train.output_dir={tmp_path / 'out'}", *extra)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_cli_missing_config_file(tmp_path):
    done = _train("--config", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2 and "nope.yaml" in done.stderr and "Traceback" not in done.stderr


def test_cli_non_finite_loss_is_one_error_line_with_exit_code_2(tiny_root, tmp_path):
    # lr 1e30: the first optimizer step blows the weights up, so the second step's loss and keys are NaN
    done = _train("--config", str(CPU_CONFIG), *_tiny_sets(tiny_root, tmp_path / "run"), "--set", "optim.lr=1e30",
                  "--set", "train.log_every=1")
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert err[0].startswith("error: non-finite ") and "in training step 2 " in err[0] and "optim.lr" in err[0]
    assert "keys" in err[0] and not [line for line in done.stdout.splitlines() if line.startswith("final ")]
