"""The synthetic generator: determinism, splits, layouts the real readers read, CLI, cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_core.config import SyntheticConfig
from reid_core.data import build_dataset, synthetic

SMALL = dict(ids=6, cams=3, images_per_id_cam=2, height=32, width=16)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=3, **SMALL)
    b = synthetic.generate(tmp_path / "b", seed=3, **SMALL)
    c = synthetic.generate(tmp_path / "c", seed=4, **SMALL)
    assert tree_bytes(a) == tree_bytes(b)
    jpgs_a = {k: v for k, v in tree_bytes(a).items() if k.endswith(".jpg")}
    jpgs_c = {k: v for k, v in tree_bytes(c).items() if k.endswith(".jpg")}
    assert len(jpgs_a) == 6 * 3 * 2
    assert set(jpgs_a.values()).isdisjoint(jpgs_c.values())


@pytest.mark.parametrize("layout,reader", [("market1501", "market1501"), ("veri776", "veri776")])
def test_real_reader_reads_it_with_disjoint_halves(tmp_path, layout, reader):
    out = synthetic.generate(tmp_path / layout, layout=layout, seed=1, **SMALL)
    ds = build_dataset(reader, out)
    train_ids = {s.pid for s in ds.train}
    test_ids = {s.pid for s in ds.query} | {s.pid for s in ds.gallery}
    assert len(train_ids) == 3 and len(test_ids) == 3 and train_ids.isdisjoint(test_ids)
    assert train_ids | test_ids == set(range(1, 7))
    # one query per (id, cam) of the test half, the rest in the gallery
    assert Counter((s.pid, s.camid) for s in ds.query) == {(p, c): 1 for p in test_ids for c in range(3)}
    assert Counter((s.pid, s.camid) for s in ds.gallery) == {(p, c): 1 for p in test_ids for c in range(3)}
    assert len(ds.train) == 3 * 3 * 2
    meta = json.loads((out / "synthetic.json").read_text())
    assert set(meta["train_ids"]) == train_ids and meta["layout"] == layout
    with Image.open(ds.train[0].path) as img:
        assert img.format == "JPEG" and img.size == (16, 32)
    assert build_dataset("synthetic", out).summary() == ds.summary()


def test_identities_differ_more_than_cameras_of_one_identity(tmp_path):
    """Images of one identity under one camera are closer (in pixels) than images of different identities
    under that camera: the identity is in the pixels, not only in the labels."""
    out = synthetic.generate(tmp_path / "d", ids=8, cams=2, images_per_id_cam=4, height=32, width=16, seed=0)
    ds = build_dataset("market1501", out)
    samples = [s for s in ds.train if s.camid == 0]
    x = np.stack([np.asarray(Image.open(s.path), dtype=np.float32).ravel() for s in samples])
    pids = np.array([s.pid for s in samples])
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same = (pids[:, None] == pids[None]) & ~np.eye(len(pids), dtype=bool)
    diff = pids[:, None] != pids[None]
    assert d[same].mean() < d[diff].mean()


def test_one_image_per_id_cam_still_gives_a_gallery(tmp_path):
    out = synthetic.generate(tmp_path / "one", ids=4, cams=3, images_per_id_cam=1, height=16, width=8, seed=0)
    ds = build_dataset("market1501", out)
    assert len(ds.query) == 2 and len(ds.gallery) == 4
    assert {s.pid for s in ds.query} == {s.pid for s in ds.gallery}


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="cams"):
        synthetic.generate(tmp_path / "x", cams=1)
    with pytest.raises(ValueError, match="layout"):
        synthetic.generate(tmp_path / "x", layout="cuhk03")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        synthetic.generate(tmp_path / "full", **SMALL)


def test_cli_writes_a_readable_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "reid_core.data.synthetic", "--out", str(out), "--layout", "veri776",
           "--ids", "4", "--cams", "2", "--seed", "5", "--images-per-id-cam", "2", "--height", "16", "--width", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 16 images" in done.stdout
    ds = build_dataset("veri776", out)
    assert len(ds.train) == 8 and len(ds.query) == 4 and len(ds.gallery) == 4
    assert synthetic.main(cmd[3:]) == 2  # the same arguments again: the folder is not empty
    assert "not empty" in capsys.readouterr().err


def test_ensure_generates_once_into_a_keyed_cache(tmp_path):
    cfg = SyntheticConfig(layout="market1501", seed=2, **SMALL)
    path = synthetic.ensure(cfg, cache_dir=tmp_path)
    assert path.parent == tmp_path / "synthetic"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary folder left behind
    stamp = (path / "synthetic.json").stat().st_mtime_ns
    assert synthetic.ensure(cfg, cache_dir=tmp_path) == path
    assert (path / "synthetic.json").stat().st_mtime_ns == stamp  # not regenerated
    other = synthetic.ensure(SyntheticConfig(layout="market1501", seed=3, **SMALL), cache_dir=tmp_path)
    assert other != path and tree_bytes(other) != tree_bytes(path)
    assert tree_bytes(path) == tree_bytes(synthetic.generate(tmp_path / "direct", seed=2, **SMALL))


def test_ensure_uses_moreid_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOREID_CACHE", str(tmp_path / "env-cache"))
    path = synthetic.ensure(SyntheticConfig(seed=9, **SMALL))
    assert str(path).startswith(str(tmp_path / "env-cache"))
    assert os.path.isdir(path / "bounding_box_train")
