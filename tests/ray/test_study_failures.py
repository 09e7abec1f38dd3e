"""Failures inside a running study, through the real CLI on a real Ray (one tiny study folder, three runs):

1. every image of the dataset is unreadable (real files with valid names, not JPEGs: the driver's listing
   passes, the trials fail): each trial ends ERROR on its first attempt (neither Tune nor Train retries a
   data error), its reason is in the progress line and results.csv's ``error`` column, and the study stops
   with that message (exit 2) since every trial failed the same way;
2. the corrected command (same name, good --data-root) replaces that study; Ctrl-C after its first trial
   finished exits 130 with "interrupted: 1 of 2 trials finished; resume with: <command>" and a partial
   results.md;
3. that exact command, with a corrected --data-root (the data moved), resumes it to exit 0.

Then errors of the training itself (two short studies): a non-finite loss (a real divergence, optim.lr 1e30)
fails its trial once, not retried; a collective (NCCL) error is retried once and then ends its trial; CUDA
out-of-memory in a one-worker trial holding half of a GPU that Ray only declares (RAY_OVERRIDE_RESOURCES)
is not retried and says the per-worker batch and the GPU share. The OOM and NCCL errors are torch's own
exception types, raised in the trial by the study's test hook (MOREID_STUDY_FAIL_RAISES).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import json

import yaml

from helpers import REPO, read_csv, trial_progress, write_space
from study.driver.checks import FAIL_HOOK_ENV, FAIL_RAISES_ENV
from reid_core.data import synthetic


def run_cli(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.run", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_data_error_not_retried_corrected_rerun_interrupt_and_resume(tmp_path):
    good = tmp_path / "good"
    synthetic.generate(good, "market1501", ids=8, cams=2, images_per_id_cam=2, height=32, width=16, seed=0)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    for image in bad.rglob("*.jpg"):
        image.write_bytes(b"not a JPEG")
    space = tmp_path / "fails.yaml"
    space.write_text(yaml.safe_dump({
        "name": "fails", "description": "test",
        "base": {"data": {"dataset": "market1501", "height": 32, "width": 16, "batch_size": 8, "num_instance": 4,
                          "workers": 0, "random_erasing": 0.0},
                 "model": {"arch": "resnet18"}, "framework": {"dict_size": 64},
                 "train": {"epochs": 2, "iters_per_epoch": 2, "eval_period": 1, "device": "cpu", "log_every": 1},
                 "eval": {"batch_size": 16}},
        "parameters": {"optim.lr": {"type": "grid", "values": [1e-3, 3e-4]}},
        "searcher": "grid", "scheduler": "none",
        "resources": {"max_concurrent": 1, "workers_per_trial": 1, "cpus_per_worker": 1},
        "retries": {"workers": 2, "trials": 2}}))
    storage = tmp_path / "studies"
    study = storage / "fails"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MOREID_CACHE": str(tmp_path / "cache")}

    # 1. A data error inside the trials.
    start = time.time()
    proc = run_cli([str(space), "--data-root", str(bad), "--storage", str(storage)], env)
    print(f"study with unreadable images: exit {proc.returncode} in {time.time() - start:.0f} s")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error: every trial failed the same way, the study stopped: DatasetError: training identity " \
           in proc.stderr and "images can be read" in proc.stderr
    assert "failed (not retried: it would fail the same way again): DatasetError" in proc.stdout
    rows = read_csv(study / "results.csv")
    assert [r["status"] for r in rows] == ["ERROR", "ERROR"]
    assert all(r["error"].startswith("DatasetError: training identity ") and "images can be read" in r["error"]
               and "object at 0x" not in r["error"] for r in rows)
    for row in rows:
        (folder,) = [p for p in study.iterdir() if p.is_dir() and f"_{row['trial_id']}_" in p.name]
        errors = folder / "error.txt"  # absent when the study stopped the trial before its failure arrived
        assert not errors.exists() or errors.read_text().count("Failure #") == 1  # Tune did not retry it
        progress = (folder / "progress.csv").read_text().strip().splitlines()
        assert len(progress) == 2  # header + the one error result: Train did not rerun the worker group

    # 2. The corrected command replaces the study; Ctrl-C once its first trial finished.
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "study.run", str(space), "--data-root", str(good),
                               "--storage", str(storage)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            rows = read_csv(study / "results.csv") if (study / "results.csv").is_file() else []
            if len(rows) == 2 and rows[0]["status"] == "TERMINATED":
                break
            time.sleep(0.3)
        assert driver.poll() is None, "the study ended before it could be interrupted"
        driver.send_signal(signal.SIGINT)
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    output = (tmp_path / "driver.log").read_text()
    assert code == 130, output[-4000:]
    assert "replacing the study in" in output
    (line,) = [line for line in output.splitlines() if line.startswith("interrupted: ")]
    assert line.startswith("interrupted: 1 of 2 trials finished; resume with: ")
    assert (study / "results.md").read_text().startswith("**partial: 1 of 2 trials finished (interrupted)")

    # 3. The printed command resumes it, with the data at a corrected location.
    moved = tmp_path / "moved"
    good.rename(moved)
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[1:3] == ["-m", "study.run"] and "--resume" in command
    start = time.time()
    proc = subprocess.run([*command, "--data-root", str(moved)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    print(f"resumed study: exit {proc.returncode} in {time.time() - start:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resume: data.root={moved} applied" in proc.stdout
    rows = read_csv(study / "results.csv")
    assert [r["status"] for r in rows] == ["TERMINATED", "TERMINATED"]
    assert all(r["error"] == "" and r["skipped_images"] == "0" for r in rows)
    assert not (study / "results.md").read_text().startswith("**partial")


def _trial_folder(study, trial_id):
    (folder,) = [p for p in study.iterdir() if p.is_dir() and f"_{trial_id}_" in p.name]
    return folder


def test_non_finite_loss_not_retried_nccl_error_retried_once_and_oom_not_retried(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MOREID_CACHE": str(tmp_path / "cache")}
    storage = tmp_path / "studies"
    retries = {"workers": 2, "trials": 2}  # a budget that the errors below do not use

    # A real divergence (lr 1e30: NaN loss and keys at step 2) and a trial whose workers raise an NCCL timeout.
    marker = tmp_path / "nccl.txt"
    space = write_space(tmp_path, "diverge", 2, {"optim.lr": {"type": "grid", "values": [1e30, 1e-3]}},
                        retries=retries)
    start = time.time()
    proc = run_cli([str(space), "--storage", str(storage)],
                   {**env, FAIL_HOOK_ENV: f"1:{marker}", FAIL_RAISES_ENV: "nccl"})
    print(f"non-finite and NCCL study: exit {proc.returncode} in {time.time() - start:.0f} s")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = storage / "diverge"
    rows = {float(r["optim.lr"]): r for r in read_csv(study / "results.csv")}
    diverged, timed_out = rows[1e30], rows[1e-3]
    assert diverged["status"] == "ERROR", diverged
    assert diverged["error"].startswith("NonFiniteError: non-finite loss/ce, loss/metric, keys in training step 2 "
                                        "(iteration 1: after 1 optimizer steps); stopped before enqueueing")
    assert diverged["error"].count("non-finite") == 1 and "optim.lr" in diverged["error"]
    assert len(trial_progress(study, diverged["trial_id"])) == 1  # the one error result: not retried
    errors = _trial_folder(study, diverged["trial_id"]) / "error.txt"
    assert not errors.exists() or errors.read_text().count("Failure #") == 1
    assert f"{diverged['trial_id']} failed (not retried" in proc.stdout and \
        f"{diverged['trial_id']} failed; retrying" not in proc.stdout

    assert timed_out["status"] == "ERROR", timed_out
    assert timed_out["error"].startswith("CollectiveError: DistBackendError: [Rank 0] Watchdog caught collective "
                                         "operation timeout"), timed_out["error"]
    assert "(a collective error again after 1 retry: not retried again" in timed_out["error"]
    assert marker.read_text().splitlines() == ["nccl raised after epoch 1", "nccl raised after epoch 2"]
    assert proc.stdout.count(f"{timed_out['trial_id']} failed; retrying from its last checkpoint") == 1
    assert list(trial_progress(study, timed_out["trial_id"])["start_epoch"])[:2] == [0, 1]  # resumed once

    # CUDA out-of-memory in a one-worker trial on half of a (declared) GPU.
    marker = tmp_path / "oom.txt"
    space = write_space(tmp_path, "oom", 2, {"optim.lr": {"type": "grid", "values": [1e-3]}}, retries=retries)
    start = time.time()
    proc = run_cli([str(space), "--storage", str(storage), "--gpus-per-worker", "0.5"],
                   {**env, FAIL_HOOK_ENV: f"1:{marker}", FAIL_RAISES_ENV: "oom",
                    "RAY_OVERRIDE_RESOURCES": json.dumps({"GPU": 1})})
    print(f"OOM study: exit {proc.returncode} in {time.time() - start:.0f} s")
    message = ("GpuMemoryError: CUDA out of memory with 8 images per worker (data.batch_size 8 over 1 worker(s)) "
               "on 0.5 GPU per worker (--gpus-per-worker): lower data.batch_size, give each worker a larger GPU "
               "share, or set train.amp=true (torch: OutOfMemoryError: CUDA out of memory. Tried to allocate "
               "2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free (raised by the test "
               "hook))")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"error: every trial failed the same way, the study stopped: {message}" in proc.stderr
    (row,) = read_csv(storage / "oom" / "results.csv")
    assert row["status"] == "ERROR" and row["error"] == message
    assert marker.read_text().splitlines() == ["oom raised after epoch 1"]  # not retried
    assert "failed; retrying" not in proc.stdout
