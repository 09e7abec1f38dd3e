"""Bad input stops a study before Ray starts: each case through the real CLI (``python -m study.run`` in a
subprocess): exit status 2, one ``error:`` line naming the bad folder, file or setting, Ray never
imported (``-X importtime`` lists every module the process loaded), no study folder left behind.

A case must end well within 15 s (measured times are printed: ``pytest -s``); the subprocess limit
below only turns a hang into a failure, it is not a speed target.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from reid_core.data import synthetic

REPO = Path(__file__).resolve().parents[2]
HANG_S = 90  # a hang, not slowness, on a loaded 2-core machine
TINY_BASE = {
    "data": {"dataset": "market1501", "height": 32, "width": 16, "batch_size": 8, "num_instance": 4, "workers": 0},
    "model": {"arch": "resnet18"},
    "train": {"epochs": 1, "iters_per_epoch": 1, "device": "cpu"},
}


def cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> tuple[int, str, str, float]:
    """Run the CLI; returns (exit status, stdout, stderr without the import-time lines, seconds)."""
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    start = time.time()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "study.run", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=HANG_S)
    seconds = time.time() - start
    imports = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imports, "python -X importtime printed no import lines"
    assert not any(re.search(r"\|\s+ray(\.|$)", line) for line in imports), "Ray was imported"
    stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    print(f"{' '.join(args)[:100]}: exit {proc.returncode} in {seconds:.1f} s")
    return proc.returncode, proc.stdout, stderr, seconds


def one_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    """A real Market-1501-layout JPEG tree: 5 training identities, 2 cameras, 2 images per camera."""
    root = tmp_path_factory.mktemp("data") / "market"
    synthetic.generate(root, "market1501", ids=10, cams=2, images_per_id_cam=2, height=32, width=16, seed=0)
    return root


def copy_of(tree: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(tree, dest)
    return dest


def space_file(folder: Path, **resources) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "base": TINY_BASE, "parameters": {"optim.lr": {"type": "grid", "values": [1e-3, 3e-4]}},
        "searcher": "grid", "scheduler": "none",
        "resources": {"max_concurrent": 1, "workers_per_trial": 1, "cpus_per_worker": 1, **resources}}))
    return path


def test_missing_or_malformed_datasets_fail_before_ray(market, tmp_path):
    storage = tmp_path / "studies"
    code, _, err, _ = cli("quickstart", "--dataset", "veri776", "--data-root", "/nonexistent", "--storage", str(storage))
    one_error(code, err, "veri776", "/nonexistent", "--data-root")

    no_query = copy_of(market, tmp_path)
    shutil.rmtree(no_query / "query")
    code, _, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(no_query), "--storage", str(storage))
    one_error(code, err, f"{no_query / 'query'}")

    shutil.copytree(market / "query", no_query / "query")
    bad = no_query / "bounding_box_train" / "IMG_1234.jpg"
    shutil.copy(next((market / "bounding_box_train").iterdir()), bad)
    code, _, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(no_query), "--storage", str(storage))
    one_error(code, err, str(bad))

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(empty), "--storage", str(storage))
    one_error(code, err, str(empty / "bounding_box_train"))
    assert not storage.exists()


def test_p_times_k_checked_against_the_identities_per_worker(market, tmp_path):
    storage = tmp_path / "studies"
    # quickstart: P = 32 / 4 = 8 identities per batch; the tree has 5 training identities.
    code, _, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(market), "--storage", str(storage))
    one_error(code, err, "5 training identities", "P = data.batch_size / data.num_instance = 32 / 4 = 8",
              "--set data.batch_size=20")
    code, out, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(market), "--storage",
                            str(storage), "--set", "data.batch_size=20", "--dry-run")
    assert code == 0, err
    # 4 images per training identity, K = 4: no warning; queries all have a match.
    assert "5 identities" in out and "no match" not in out and "warning" not in out
    # Two workers share 5 identities: 2 each, P = 2 * ... fits; P = 5 does not.
    code, _, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(market), "--storage",
                          str(storage), "--set", "data.batch_size=20", "--workers-per-trial", "2")
    one_error(code, err, "split over 2 workers give each 2", "on each worker", "--set data.batch_size=8")
    assert not storage.exists()


def test_k_above_image_counts_warns_and_unmatched_queries_are_counted(market, tmp_path):
    tree = copy_of(market, tmp_path)
    gallery = tree / "bounding_box_test"
    query_pid = next((tree / "query").iterdir()).name[:4]
    for image in gallery.glob(f"{query_pid}_*"):
        image.unlink()  # this identity's queries lose every match
    code, out, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(tree), "--dry-run",
                            "--set", "data.batch_size=30", "--set", "data.num_instance=6")
    assert code == 0, err
    assert "warning: 5 of 5 training identities of market1501 have fewer than K = data.num_instance = 6 images " \
           "(fewest: 4)" in out
    assert out.count("warning:") == 1  # once, though 8 trials use it
    assert "2 queries have no match in the gallery" in out


def test_storage_name_and_address_errors(market, tmp_path):
    space = space_file(tmp_path)
    data = ["--data-root", str(market)]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    code, _, err, _ = cli(str(space), *data, "--storage", str(a_file))
    one_error(code, err, str(a_file), "is a file")

    code, _, err, seconds = cli(str(space), *data, "--storage", "s3://moreid-no-such-bucket/x", "--dry-run")
    one_error(code, err, "s3://moreid-no-such-bucket/x")

    storage = tmp_path / "studies"
    code, _, err, _ = cli(str(space), *data, "--storage", str(storage), "--name", "../escape")
    one_error(code, err, "--name '../escape'")
    assert not (tmp_path / "escape").exists() and not storage.exists()

    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err, _ = cli(str(space), *data, "--storage", str(storage), "--address", f"127.0.0.1:{port}")
    one_error(code, err, f"--address 127.0.0.1:{port}", "cannot connect")
    code, _, err, _ = cli(str(space), *data, "--storage", str(storage), "--address", "10.255.255.1:6379")
    one_error(code, err, "--address 10.255.255.1:6379")
    assert not storage.exists()  # no study.json from the failed starts


def test_constraints_against_what_can_be_drawn_and_resume_overrides(tmp_path):
    # beta pinned at 1.3 while alpha is searched over [0.6, 2.0]: most of alpha's range is feasible.
    cluster = ("--dry-run", "--address", "auto")  # its data are read on the cluster
    code, out, err, _ = cli("ranked_list", "--set", "loss.beta=1.3", *cluster)
    assert code == 0, err
    assert "picks loss.alpha" in out and "read on a worker node before the first trial" in out
    code, _, err, _ = cli("ranked_list", "--set", "loss.beta=2.5", *cluster)
    one_error(code, err, "loss.beta < loss.alpha")
    # A resumed study keeps what it trains: an override that would change it is refused by name.
    code, _, err, _ = cli("quickstart", "--resume", "--storage", str(tmp_path), "--set", "train.epochs=8")
    one_error(code, err, "--set train.epochs cannot change")
    code, _, err, _ = cli("quickstart", "--resume", "--storage", str(tmp_path), "--num-samples", "3")
    one_error(code, err, "--num-samples cannot change")
