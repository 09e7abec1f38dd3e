"""Studies end to end on a real Ray: tiny ResNet-18 trials on tiny synthetic data (8 identities, 2 cameras,
32x16 images, 2 iterations per epoch). One-worker trials train in the Tune trial's own process; trials of
several workers run a Ray Train TorchTrainer. Both paths are covered:

- one worker: an ASHA study (trials stopped early, and the trials after them still start), a trial whose
  process dies once and is retried from its checkpoint, a study on a Ray head this test starts on 127.0.0.1
  (reached with --address, stopped by its process id), a study whose driver is killed mid-study, resumed
  with --resume without re-running finished trials;
- two CPU workers (DDP over gloo): an ASHA study whose first trial's rank-0 worker dies once and is retried
  from its checkpoint, with trials stopped early and trials after them still starting (docs/design.md, "The study platform"
  trap: Train must give back the resources of a run Tune stopped), its global batch of 16 split 8 + 8;
- pretrained weights: ``imagenet`` fetched from a file:// copy (``MOREID_WEIGHTS_SOURCES``) into the cache
  and verified before Ray starts, the trial reading that local file (counts in results.csv).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import torchvision
import yaml
from optuna.trial import TrialState

from helpers import REPO, free_port, process_tree, read_csv, stop_leftovers, trial_progress, write_space
from study import run
from study.driver.checks import FAIL_HOOK_ENV
from study.record.common import FIXED_COLUMNS

pytestmark = pytest.mark.usefixtures("ray_env")


def test_asha_stops_trials_early_and_later_trials_still_start(tmp_path, capsys):
    lrs = [3e-3, 1e-6, 1e-3, 3e-6]
    space = write_space(tmp_path, "asha", 2, {"optim.lr": {"type": "grid", "values": lrs}},
                        scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 2},
                        resources={"max_concurrent": 2, "workers_per_trial": 1, "cpus_per_worker": 1})
    start = time.time()
    assert run.main([str(space), "--storage", str(tmp_path / "studies")]) == 0
    print(f"ASHA study: {time.time() - start:.0f} s")
    out = capsys.readouterr().out
    study = tmp_path / "studies" / "asha"
    rows = read_csv(study / "results.csv")
    assert len(rows) == 4  # every trial ran, including those queued behind early-stopped ones
    statuses = [r["status"] for r in rows]
    assert set(statuses) <= {"TERMINATED", "STOPPED"}
    stopped = [r for r in rows if r["status"] == "STOPPED"]
    assert stopped and all(r["epochs"] == "1" for r in stopped)
    assert all(r["epochs"] == "2" for r in rows if r["status"] == "TERMINATED")
    # A trial that started after the first early stop (its resources were given back).
    assert sorted(float(r["optim.lr"]) for r in rows) == sorted(lrs)
    assert all(r["final_mAP"] and 0 <= float(r["best_mAP"]) <= 100 for r in rows)
    assert list(rows[0])[:len(FIXED_COLUMNS)] == list(FIXED_COLUMNS)
    runs = [p for p in (study / "tensorboard").iterdir() if p.is_dir()]
    assert len(runs) == 4 and all(p.name[:3].isdigit() for p in runs)  # one readable run per trial
    assert list((study / "tensorboard").glob("events.out.tfevents.*"))  # and the HParams experiment summary
    assert "stopped early by the scheduler at epoch 1" in out
    assert "results table" in out and "tensorboard --logdir" in out
    assert (study / "results.md").is_file()


def test_one_worker_trial_process_dies_and_is_retried_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "died"
    monkeypatch.setenv(FAIL_HOOK_ENV, f"1:{marker}")
    space = write_space(tmp_path, "inproc", 3, {"framework.name": {"type": "grid", "values": ["moreid"]}},
                        retries={"workers": 1, "trials": 0})  # the process death spends the worker retry
    start = time.time()
    assert run.main([str(space), "--storage", str(tmp_path / "studies")]) == 0
    print(f"one-worker study with a trial process death: {time.time() - start:.0f} s")
    out = capsys.readouterr().out
    assert marker.is_file()  # the trial's process did die after epoch 1
    study = tmp_path / "studies" / "inproc"
    (row,) = read_csv(study / "results.csv")
    assert row["status"] == "TERMINATED" and row["epochs"] == "3"
    progress = trial_progress(study, row["trial_id"])
    assert list(progress["epoch"]) == [1, 2, 3]  # not restarted from scratch
    assert list(progress["start_epoch"]) == [0, 1, 1]  # the new trial process loaded the epoch-1 checkpoint
    assert set(progress["world_size"]) == {1} and set(progress["ddp_backend"]) == {"none"}
    assert "retrying from its last checkpoint" in out
    assert "(resumed from the epoch-1 checkpoint)" in out
    assert "Reporting training result" not in out and "TrainingReport" not in out  # a quiet console
    assert "winner: " in out and "One seed is not evidence" in out


def test_two_gloo_workers_asha_and_a_worker_death_resumed_from_checkpoint(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "died"
    monkeypatch.setenv(FAIL_HOOK_ENV, f"1:{marker}")
    lrs = [3e-3, 1e-6, 3e-6, 1e-3]
    space = write_space(tmp_path, "ddp", 2, {"optim.lr": {"type": "grid", "values": lrs}},
                        scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": 2},
                        resources={"max_concurrent": 1, "workers_per_trial": 2, "cpus_per_worker": 1})
    global_batch(space, 16)  # data.batch_size is global: 2 workers x 8 images (2 identities x K = 4) each
    start = time.time()
    assert run.main([str(space), "--storage", str(tmp_path / "studies")]) == 0
    print(f"2-worker ASHA study with a worker death: {time.time() - start:.0f} s")
    out = capsys.readouterr().out
    assert marker.is_file()  # the first trial's rank-0 worker did die after epoch 1
    study = tmp_path / "studies" / "ddp"
    rows = read_csv(study / "results.csv")
    assert sorted(float(r["optim.lr"]) for r in rows) == sorted(lrs)  # every trial ran, one after the other
    first = rows[0]
    assert first["status"] == "TERMINATED" and first["epochs"] == "2"
    progress = trial_progress(study, first["trial_id"])
    assert list(progress["epoch"]) == [1, 2]  # not restarted from scratch
    assert list(progress["start_epoch"]) == [0, 1]  # the new worker group loaded the epoch-1 checkpoint
    assert set(progress["world_size"]) == {2} and set(progress["ddp_backend"]) == {"gloo"}
    assert all((r["batch_global"], r["workers"], r["batch_per_worker"]) == ("16", "2", "8") for r in rows)
    assert list(progress["batch_per_worker"])[:1] == [8]  # in the trial's first result
    # A trial stopped early that is not the last one: the trial after it got its workers' CPUs back.
    stopped = [i for i, r in enumerate(rows) if r["status"] == "STOPPED"]
    assert stopped and stopped[0] < len(rows) - 1 and all(rows[i]["epochs"] == "1" for i in stopped)
    assert "Reporting training result" not in out and "TrainingReport" not in out


def global_batch(space: Path, batch: int) -> None:
    """Set the global ``data.batch_size`` of a written space (TINY_BASE's 8 stays for one-worker trials)."""
    raw = yaml.safe_load(space.read_text())
    raw["base"]["data"]["batch_size"] = batch
    space.write_text(yaml.safe_dump(raw))


def test_imagenet_weights_verified_before_ray_and_trials_read_the_local_file(tmp_path, monkeypatch, capsys):
    # A site's own copy of the ImageNet file, at a file:// URL with its SHA-256 (nothing is downloaded).
    published = tmp_path / "mirror" / "resnet18-mirror.pth"
    published.parent.mkdir()
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, published)
    sources = tmp_path / "sources.yaml"
    sources.write_text(yaml.safe_dump({"resnet18": {"url": published.as_uri(),
                                                    "sha256": hashlib.sha256(published.read_bytes()).hexdigest()}}))
    monkeypatch.setenv("MOREID_WEIGHTS_SOURCES", str(sources))
    cache = tmp_path / "cache"
    space = write_space(tmp_path, "weights", 1, {"optim.lr": {"type": "grid", "values": [1e-3]}})
    assert run.main([str(space), "--storage", str(tmp_path / "studies"), "--set", "model.pretrained=imagenet",
                     "--set", f"model.pretrained_cache={cache}"]) == 0
    out = capsys.readouterr().out
    fetched = cache / published.name
    assert fetched.read_bytes() == published.read_bytes()  # fetched once into the cache, before the trials
    loaded = len(state) - 2  # every tensor but the ImageNet classifier fc.weight, fc.bias
    assert f"pretrained: imagenet -> {fetched} (torchvision form; {loaded} backbone tensors loaded, 2 skipped" in out
    study = tmp_path / "studies" / "weights"
    (row,) = read_csv(study / "results.csv")
    assert row["status"] == "TERMINATED" and row["model.pretrained"] == str(fetched)  # the trial read the file
    assert (row["pretrained/form"], row["pretrained/loaded"], row["pretrained/skipped"]) == ("torchvision",
                                                                                              str(loaded), "2")
    assert (row["batch_global"], row["workers"], row["batch_per_worker"]) == ("8", "1", "8")
    first = trial_progress(study, row["trial_id"]).iloc[0]
    assert first["pretrained/loaded"] == loaded and first["pretrained/path"] == str(fetched)


def test_study_on_an_existing_head_reached_with_address(tmp_path):
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    # No token authentication on this throwaway head, nor in the driver (a fresh process, as a user runs
    # it): a driver that names an explicit address sends no token unless RAY_AUTH_MODE=token (Ray 2.60).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--block", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    head_tree: list[int] = []
    try:
        deadline = time.time() + 90
        while time.time() < deadline and head.poll() is None:  # GCS and dashboard both listening
            with socket.socket() as gcs, socket.socket() as web:
                if gcs.connect_ex(("127.0.0.1", port)) == 0 and web.connect_ex(("127.0.0.1", dashboard)) == 0:
                    break
            time.sleep(0.5)
        assert head.poll() is None, "the Ray head did not start"
        space = write_space(tmp_path, "remote", 1, {"loss.name": {"type": "grid", "values": ["he"]}})
        start = time.time()
        driver = subprocess.run([sys.executable, "-m", "study.run", str(space), "--storage", str(tmp_path / "studies"),
                                 "--address", f"127.0.0.1:{port}"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        print(f"study on an existing head: {time.time() - start:.0f} s")
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        assert f"Ray at 127.0.0.1:{port}" in driver.stdout
        (row,) = read_csv(tmp_path / "studies" / "remote" / "results.csv")
        assert row["status"] == "TERMINATED" and row["epochs"] == "1" and row["final_mAP"]
        head_tree = process_tree(head.pid)
        assert head.poll() is None  # the study left the cluster it did not start running
    finally:
        head_tree = head_tree or process_tree(head.pid)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node on SIGTERM
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            head.kill()  # it drains for up to 30 s; the test does not need to wait for that
            head.wait()
        stop_leftovers(head_tree, timeout=5)  # processes of the head this test started
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert head.returncode is not None


def second_trial_epochs(study: Path, row: dict[str, str]) -> int:
    """Epochs a trial has reported, from its progress.csv (0 when none yet)."""
    try:
        return len(trial_progress(study, row["trial_id"]))
    except (ValueError, FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def test_resume_after_the_driver_is_killed(tmp_path):
    # 8 steps an epoch: the driver is killed inside the second trial's run, not after it (2-step epochs of
    # under a second could end the trial before the kill lands)
    space = write_space(tmp_path, "resume", 3, {"optim.lr": {"type": "grid", "values": [1e-3, 3e-4]}},
                        iters_per_epoch=8)
    storage = tmp_path / "studies"
    study = storage / "resume"
    results = study / "results.csv"
    log = (tmp_path / "driver.log").open("w")  # a file, not a pipe nobody reads (it would fill and block)
    started = time.time()
    driver = subprocess.Popen([sys.executable, "-m", "study.run", str(space), "--storage", str(storage)],
                              cwd=REPO, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    tree: list[int] = []
    try:
        deadline = time.time() + 240
        rows: list[dict[str, str]] = []
        while time.time() < deadline and driver.poll() is None:
            rows = read_csv(results) if results.is_file() else []
            # kill once the first trial finished and the second has a checkpoint past epoch 1 (its progress.csv,
            # written per result; results.csv takes epoch results in a few seconds)
            if len(rows) >= 2 and rows[0]["status"] == "TERMINATED" and second_trial_epochs(study, rows[1]) >= 1:
                break
            time.sleep(0.1)
        assert driver.poll() is None, "the study ended before it could be interrupted"
        tree = process_tree(driver.pid)
        driver.kill()
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        stop_leftovers(tree, timeout=3)  # Ray processes of the killed driver's local cluster
        log.close()
    print(f"first driver killed after {time.time() - started:.0f} s")
    before = read_csv(results)
    first_id, second_id = before[0]["trial_id"], before[1]["trial_id"]
    first_progress = trial_progress(study, first_id)
    assert before[1]["status"] == "RUNNING"
    record = optuna.load_study(study_name="resume", storage=f"sqlite:///{study}/optuna.db")
    first_record = {t.user_attrs["tune_trial_id"]: t for t in record.get_trials()}[first_id]
    assert first_record.state == TrialState.COMPLETE

    start = time.time()
    assert run.main([str(space), "--storage", str(tmp_path / "elsewhere"), "--resume"]) == 2  # nothing to resume
    assert run.main([str(space), "--storage", str(storage)]) == 2  # the study exists: it needs --resume
    assert run.main([str(space), "--storage", str(storage), "--resume"]) == 0
    print(f"resumed study: {time.time() - start:.0f} s")
    after = read_csv(results)
    assert [r["trial_id"] for r in after] == [first_id, second_id]
    assert all(r["status"] == "TERMINATED" and r["epochs"] == "3" for r in after)
    # The finished trial was not run again: its reported results are exactly those from before.
    pd.testing.assert_frame_equal(trial_progress(study, first_id), first_progress)
    # The interrupted trial carried on from its last checkpoint instead of starting over.
    second = trial_progress(study, second_id)
    assert second["start_epoch"].iloc[-1] >= 1 and second["epoch"].iloc[-1] == 3
    # The Optuna record carried on: the same two trials (grid: fixed parameters), none RUNNING, no duplicate.
    trials = optuna.load_study(study_name="resume", storage=f"sqlite:///{study}/optuna.db").get_trials()
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in trials}
    assert len(trials) == 2 and set(by_tune) == {first_id, second_id}
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert by_tune[first_id].datetime_complete == first_record.datetime_complete  # not recorded twice
    assert sorted(by_tune[second_id].intermediate_values) == [1, 2, 3]
    assert {t.params["optim.lr"] for t in trials} == {1e-3, 3e-4}
