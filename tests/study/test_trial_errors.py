"""The trial's error protocol (study/trial/errors.py) without Ray: which errors are retried, CUDA out-of-memory
translated into a message naming the per-worker batch and the GPU share, the collective-error count of a
trial folder, the GPU memory cap of a one-worker trial, and fractional GPUs for several-worker trials
refused by the CLI before Ray is imported (one ``error:`` line, exit 2)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from reid_core.config import ConfigError
from reid_core.data.datasets import DatasetError
from reid_core.engine.finite import NonFiniteError
from study.space import SpaceError, parse_space
from study.trial.errors import (GpuMemoryError, collective_errors, error_line, is_collective, is_deterministic,
                                is_out_of_memory, record_collective_error, translate)
from study.trial.worker import cap_gpu_memory

REPO = Path(__file__).resolve().parents[2]
OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
NCCL_TIMEOUT = ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE) "
                "ran for 600000 milliseconds before timing out")


def test_deterministic_errors_are_not_retried_and_crashes_are():
    non_finite = NonFiniteError("non-finite loss/ce in training step 2 (iteration 1: after 1 optimizer steps)")
    assert is_deterministic(non_finite)
    assert is_deterministic(ConfigError("optim.lr: bad"))
    assert is_deterministic(torch.OutOfMemoryError(OOM_TEXT))
    assert is_deterministic(RuntimeError(OOM_TEXT))  # older torch raised a RuntimeError with that text
    assert not is_deterministic(RuntimeError("worker crashed"))
    assert not is_deterministic(dist.DistBackendError(NCCL_TIMEOUT))  # retried (once: see the worker loop)
    assert error_line(non_finite).startswith("NonFiniteError: non-finite loss/ce in training step 2")


def test_error_lines_leave_out_object_addresses():
    # the same unreadable file read by two trial processes: one message, so the study sees one error
    first, second = (error_line(DatasetError(f"training identity 3: none of its 4 images can be read (e.g. a.jpg: "
                                             f"cannot identify image file <_io.BytesIO object at {address}>)"))
                     for address in ("0x7fd2734f4b30", "0x7f7202c06ca0"))
    assert first == second == ("DatasetError: training identity 3: none of its 4 images can be read (e.g. a.jpg: "
                               "cannot identify image file <_io.BytesIO object>)")


def test_collective_errors_are_recognised_by_type_and_message():
    assert is_collective(dist.DistBackendError("unhandled system error"))
    assert is_collective(RuntimeError(NCCL_TIMEOUT))
    assert is_collective(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error"))
    assert not is_collective(RuntimeError("worker crashed"))
    assert not is_collective(torch.OutOfMemoryError(OOM_TEXT))
    assert is_out_of_memory(torch.OutOfMemoryError("anything")) and not is_out_of_memory(RuntimeError("x"))


def test_out_of_memory_is_translated_with_the_per_worker_batch_and_the_gpu_share():
    error = translate(torch.OutOfMemoryError(OOM_TEXT), batch_size=64, world_size=2, gpu_share=0.5)
    assert isinstance(error, GpuMemoryError) and is_deterministic(error)
    line = error_line(error)
    assert line.startswith("GpuMemoryError: CUDA out of memory with 32 images per worker (data.batch_size 64 over "
                           "2 worker(s)) on 0.5 GPU per worker (--gpus-per-worker)"), line
    assert "lower data.batch_size" in line and "Tried to allocate 2.00 GiB" in line
    other = RuntimeError("worker crashed")
    assert translate(other, batch_size=64, world_size=2, gpu_share=0.5) is other


def test_collective_errors_are_counted_in_the_trial_folder(tmp_path):
    folder = str(tmp_path / "trial_00000")
    assert collective_errors(folder) == 0
    record_collective_error(folder, dist.DistBackendError(NCCL_TIMEOUT))
    assert collective_errors(folder) == 1
    record_collective_error(folder, dist.DistBackendError("NCCL error"))
    assert collective_errors(folder) == 2
    text = (tmp_path / "trial_00000" / "collective_errors.txt").read_text()
    assert "Watchdog caught collective operation timeout" in text


def test_a_fractional_gpu_caps_the_trial_process_memory():
    assert cap_gpu_memory(0.0) == "" and cap_gpu_memory(1.0) == ""
    note = cap_gpu_memory(0.25)
    if not torch.cuda.is_available():
        assert note == "GPU share 0.25: no CUDA device in this process, so no memory cap"
        return
    assert "capped to 0.25" in note
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        with pytest.raises(torch.OutOfMemoryError):  # more than a quarter of the GPU
            torch.empty(int(total * 0.4), dtype=torch.uint8, device="cuda")
        torch.empty(int(total * 0.1), dtype=torch.uint8, device="cuda")  # within the share
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def _space(**resources) -> dict:
    return {"name": "gpus", "base": {"data": {"dataset": "synthetic"}, "train": {"epochs": 1}},
            "parameters": {"optim.lr": {"type": "grid", "values": [1e-3]}}, "searcher": "grid",
            "resources": {"workers_per_trial": 1, **resources}}


def test_gpu_shares_of_the_space_and_the_command_line():
    assert parse_space(_space(gpus_per_worker=0.5)).resources.gpus_per_worker == 0.5  # one worker: shared GPU
    assert parse_space(_space(gpus_per_worker=2, workers_per_trial=2)).resources.workers_per_trial == 2
    with pytest.raises(SpaceError, match=r"^s.yaml: --gpus-per-worker \(the space's resources.gpus_per_worker\) "
                                         r"0.5 with 2 workers per trial: a trial of several workers needs whole"):
        parse_space(_space(gpus_per_worker=0.5, workers_per_trial=2), source="s.yaml")
    with pytest.raises(SpaceError, match=r"^s.yaml: --gpus-per-worker 0.5 with 3 workers per trial"):
        parse_space(_space(), source="s.yaml", resources={"gpus_per_worker": 0.5, "workers_per_trial": 3})
    with pytest.raises(SpaceError, match=r"--gpus-per-worker 1.5: more than one GPU per worker must be a whole"):
        parse_space(_space(), source="s.yaml", resources={"gpus_per_worker": 1.5})


def test_cli_refuses_a_fractional_gpu_for_several_workers_before_ray(tmp_path):
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(_space()))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "study.run", str(path), "--storage",
                           str(tmp_path / "studies"), "--gpus-per-worker", "0.5", "--workers-per-trial", "2"],
                          cwd=REPO, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, capture_output=True,
                          text=True, timeout=120)
    imports = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imports and not any(re.search(r"\|\s+ray(\.|$)", line) for line in imports), "Ray was imported"
    err = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert err == [f"error: {path}: --gpus-per-worker 0.5 with 2 workers per trial: a trial of several workers "
                   f"needs whole GPUs (NCCL cannot put two ranks on one GPU); give --gpus-per-worker 1, or "
                   f"--workers-per-trial 1 to share GPUs between one-worker trials"], err
    assert not (tmp_path / "studies").exists()
