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


def test_p_times_k_checked_against_the_training_identities(market, tmp_path):
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
    assert "batch: 20 images per step (global: P = 5 identities x K = 4), 1 worker" in out
    # data.batch_size is the global batch: 2 workers share P = 16 / 4 = 4 of the 5 identities (2 each),
    # where a per-worker batch would have needed 8.
    code, out, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(market), "--storage",
                            str(storage), "--set", "data.batch_size=16", "--workers-per-trial", "2", "--dry-run")
    assert code == 0, err
    assert "batch: 16 images per step (global: P = 4 identities x K = 4), 2 workers x 8 images each" in out
    # P = 6 > 5 identities: the fix keeps P a multiple of the 2 workers.
    code, _, err, _ = cli("quickstart", "--dataset", "market1501", "--data-root", str(market), "--storage",
                          str(storage), "--set", "data.batch_size=24", "--workers-per-trial", "2")
    one_error(code, err, "5 training identities", "= 24 / 4 = 6", "global batch of 2 workers",
              "--set data.batch_size=16")
    assert not storage.exists()


def test_global_batch_checked_for_every_planned_trial_before_ray(market, tmp_path):
    storage = tmp_path / "studies"
    data = ["--dataset", "market1501", "--data-root", str(market), "--storage", str(storage)]
    # 8 images of K = 4 over 3 workers: not whole identities per worker.
    code, _, err, _ = cli(str(space_file(tmp_path)), *data, "--workers-per-trial", "3")
    one_error(code, err, "--workers-per-trial 3", "data.batch_size 8", "3 x 4 = 12", "data.batch_size=12",
              "--workers-per-trial 2")
    # Every planned trial is checked, not only the base: the second value of a searched batch fails.
    searched = tmp_path / "searched.yaml"
    space = yaml.safe_load(space_file(tmp_path).read_text())
    space["parameters"] = {"data.batch_size": {"type": "grid", "values": [8, 12]}}
    searched.write_text(yaml.safe_dump(space))
    code, _, err, _ = cli(str(searched), *data, "--workers-per-trial", "2", "--dry-run")
    one_error(code, err, "data.batch_size 12", "2 x 4 = 8", "data.batch_size=16 or 8")
    assert not storage.exists()


def _weights_file(path: Path, drop: str = "") -> Path:
    """A ResNet-18 state dict in torchvision form (random values), without the tensors starting ``drop``."""
    import torch
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if not (drop and k.startswith(drop))}, path)
    return path


def test_pretrained_planned_without_fetching_and_bad_weights_fail_before_ray(market, tmp_path):
    storage = tmp_path / "studies"
    data = ["--dataset", "market1501", "--data-root", str(market), "--storage", str(storage)]
    cache = tmp_path / "cache"
    # A dry run says what a run would do and neither fetches (the cache stays absent) nor loads.
    code, out, err, _ = cli(str(space_file(tmp_path)), *data, "--dry-run", "--set", "model.pretrained=imagenet",
                            "--set", f"model.pretrained_cache={cache}")
    assert code == 0, err
    assert f"pretrained: imagenet (R18, fetched once into {cache}" in out and not cache.exists()
    code, out, err, _ = cli(str(space_file(tmp_path)), *data, "--dry-run")
    assert code == 0, err
    assert "pretrained: none: random init of R18 (not the paper's setting" in out
    # A file lacking a backbone tensor: one line naming it, before Ray (cli asserts Ray was never imported).
    bad = _weights_file(tmp_path / "no_layer4.pth", drop="layer4.1.")
    code, _, err, _ = cli(str(space_file(tmp_path)), *data, "--set", f"model.pretrained={bad}")
    one_error(code, err, "layer4.1.")
    # imagenet from a site's own sources file (MOREID_WEIGHTS_SOURCES): a wrong checksum fails and caches nothing.
    published = _weights_file(tmp_path / "resnet18-mirror.pth")
    sources = tmp_path / "sources.yaml"
    sources.write_text(yaml.safe_dump({"resnet18": {"url": published.as_uri(), "sha256": "0" * 64}}))
    code, _, err, _ = cli(str(space_file(tmp_path)), *data, "--set", "model.pretrained=imagenet",
                          "--set", f"model.pretrained_cache={cache}", env={"MOREID_WEIGHTS_SOURCES": str(sources)})
    one_error(code, err, published.as_uri(), "0" * 64, "nothing was cached")
    assert not list(cache.glob("*.pth"))
    # An unreachable source: a clear error, before Ray.
    sources.write_text(yaml.safe_dump({"resnet18": {"url": (tmp_path / "absent.pth").as_uri(), "sha256": "0" * 64}}))
    code, _, err, _ = cli(str(space_file(tmp_path)), *data, "--set", "model.pretrained=imagenet",
                          "--set", f"model.pretrained_cache={cache}", env={"MOREID_WEIGHTS_SOURCES": str(sources)})
    one_error(code, err, "could not download", "absent.pth")
    # A sources file naming an unknown architecture is refused by name.
    sources.write_text(yaml.safe_dump({"resnet51": {"url": published.as_uri(), "sha256": "0" * 64}}))
    code, _, err, _ = cli(str(space_file(tmp_path)), *data, "--set", "model.pretrained=imagenet",
                          env={"MOREID_WEIGHTS_SOURCES": str(sources)})
    one_error(code, err, "MOREID_WEIGHTS_SOURCES", "'resnet51'")
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
