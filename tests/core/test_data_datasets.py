"""Dataset readers on small JPEG trees built in tmp_path."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from reid_core.data import DATASET_NAMES, DatasetError, Sample, build_dataset


def jpeg(path: Path, colour: tuple[int, int, int] = (120, 60, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), colour).save(path, "JPEG", quality=90)
    return path


def market_tree(root: Path) -> None:
    for name in ("0002_c1s1_000451_03.jpg", "0002_c3s1_000551_01.jpg", "0007_c6s2_001234_02.jpg"):
        jpeg(root / "bounding_box_train" / name)
    for name in ("0003_c2s1_000100_00.jpg", "0005_c4s3_000200_01.jpg"):
        jpeg(root / "query" / name)
    for name in ("0003_c1s1_000101_00.jpg", "0005_c5s3_000201_01.jpg", "0000_c1s1_000300_01.jpg",
                 "-1_c2s1_000400_02.jpg", "-1_c3s1_000401_02.jpg"):
        jpeg(root / "bounding_box_test" / name)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")


def test_market1501_reads_ids_cams_skips_junk_keeps_distractors(tmp_path):
    market_tree(tmp_path)
    ds = build_dataset("market1501", tmp_path)
    assert sorted((s.pid, s.camid) for s in ds.train) == [(2, 0), (2, 2), (7, 5)]
    assert sorted((s.pid, s.camid) for s in ds.query) == [(3, 1), (5, 3)]
    assert sorted((s.pid, s.camid) for s in ds.gallery) == [(0, 0), (3, 0), (5, 4)]  # -1 gone, 0 kept
    assert all(isinstance(s, Sample) and Path(s.path).is_file() for s in ds.train + ds.query + ds.gallery)
    assert ds.num_train_pids == 2
    assert ds.summary() == {"train": {"images": 3, "ids": 2, "cams": 3},
                            "query": {"images": 2, "ids": 2, "cams": 2},
                            "gallery": {"images": 3, "ids": 3, "cams": 2}}


def test_market1501_under_versioned_subfolder(tmp_path):
    market_tree(tmp_path / "Market-1501-v15.09.15")
    ds = build_dataset("market1501", tmp_path)
    assert len(ds.train) == 3 and len(ds.gallery) == 3
    assert ds.root == str(tmp_path / "Market-1501-v15.09.15")


def test_veri776(tmp_path):
    for name in ("0001_c001_00016450_0.jpg", "0001_c019_00016455_0.jpg", "0004_c002_00000001_1.jpg"):
        jpeg(tmp_path / "image_train" / name)
    jpeg(tmp_path / "image_query" / "0002_c020_00030600_1.jpg")
    jpeg(tmp_path / "image_test" / "0002_c005_00030700_0.jpg")
    jpeg(tmp_path / "image_test" / "0003_c010_00030800_0.jpg")
    ds = build_dataset("veri776", tmp_path)
    assert sorted((s.pid, s.camid) for s in ds.train) == [(1, 0), (1, 18), (4, 1)]
    assert [(s.pid, s.camid) for s in ds.query] == [(2, 19)]
    assert sorted((s.pid, s.camid) for s in ds.gallery) == [(2, 4), (3, 9)]


def veriwild_tree(root: Path) -> None:
    split = root / "train_test_split"
    split.mkdir(parents=True)
    info = ["id/image;Camera ID;Time;Model;Type;Color"]
    train = ["00001/000001", "00001/000002", "00002/000003"]
    test_ids = {3000: ["00010", "00011"], 5000: ["00010", "00011", "00012"],
                10000: ["00010", "00011", "00012", "00013"]}
    cams = {"00001/000001": "005", "00001/000002": "017", "00002/000003": "005"}
    for vid in test_ids[10000]:
        for j, cam in enumerate(("017", "042", "005")):
            cams[f"{vid}/{vid}{j}"] = cam
    for key, cam in cams.items():
        jpeg(root / "images" / f"{key}.jpg")
        info.append(f"{key};{cam};2018-03-11 10:00:00;Audi;SUV;white")
    (split / "vehicle_info.txt").write_text("\n".join(info) + "\n")
    (split / "train_list.txt").write_text("\n".join(train) + "\n")
    for n, vids in test_ids.items():
        (split / f"test_{n}_query.txt").write_text("".join(f"{v}/{v}0\n" for v in vids))
        (split / f"test_{n}.txt").write_text("".join(f"{v}/{v}{j}\n" for v in vids for j in (1, 2)))


@pytest.mark.parametrize("size,n_ids", [("small", 2), ("medium", 3), ("large", 4)])
def test_veriwild_subsets(tmp_path, size, n_ids):
    veriwild_tree(tmp_path)
    ds = build_dataset(f"veriwild-{size}", tmp_path)
    # cameras 005, 017, 042 become 0, 1, 2
    assert [(s.pid, s.camid) for s in ds.train] == [(1, 0), (1, 1), (2, 0)]
    assert ds.train[0].path == str(tmp_path / "images" / "00001" / "000001.jpg")
    assert len(ds.query) == n_ids and {s.camid for s in ds.query} == {1}
    assert len(ds.gallery) == 2 * n_ids and {s.camid for s in ds.gallery} == {2, 0}
    assert {s.pid for s in ds.query} == {s.pid for s in ds.gallery} == set(range(10, 10 + n_ids))
    assert all(Path(s.path).is_file() for s in ds.query + ds.gallery)


def test_synthetic_name_detects_either_layout(tmp_path):
    market_tree(tmp_path / "m")
    jpeg(tmp_path / "v" / "image_train" / "0001_c001_00016450_0.jpg")
    (tmp_path / "v" / "image_query").mkdir()
    (tmp_path / "v" / "image_test").mkdir()
    assert len(build_dataset("synthetic", tmp_path / "m").gallery) == 3
    assert build_dataset("synthetic", tmp_path / "v").train[0].pid == 1
    with pytest.raises(DatasetError, match="neither"):
        build_dataset("synthetic", tmp_path)


def test_counts_are_logged(tmp_path, caplog):
    market_tree(tmp_path)
    with caplog.at_level(logging.INFO, logger="reid_core.data"):
        build_dataset("market1501", tmp_path)
    text = caplog.text
    assert "market1501" in text and "gallery" in text and "train" in text


@pytest.mark.parametrize("name", ["market1501", "veri776", "veriwild-small", "synthetic"])
def test_missing_root_folder_is_named(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        build_dataset(name, missing)


def test_missing_split_folder_is_named(tmp_path):
    market_tree(tmp_path)
    (tmp_path / "query" / "0003_c2s1_000100_00.jpg").unlink()
    (tmp_path / "query" / "0005_c4s3_000200_01.jpg").unlink()
    (tmp_path / "query").rmdir()
    with pytest.raises(DatasetError, match=r"folder not found: .*query"):
        build_dataset("market1501", tmp_path)


@pytest.mark.parametrize("missing", ["test_5000_query.txt", "vehicle_info.txt", "train_list.txt"])
def test_missing_veriwild_list_file_is_named(tmp_path, missing):
    veriwild_tree(tmp_path)
    (tmp_path / "train_test_split" / missing).unlink()
    with pytest.raises(DatasetError, match=missing.replace(".", r"\.")):
        build_dataset("veriwild-medium", tmp_path)


def test_unparsable_file_name_is_named(tmp_path):
    market_tree(tmp_path)
    jpeg(tmp_path / "bounding_box_train" / "person_12.jpg")
    with pytest.raises(DatasetError, match="person_12.jpg"):
        build_dataset("market1501", tmp_path)


def test_unparsable_veriwild_line_is_named(tmp_path):
    veriwild_tree(tmp_path)
    with (tmp_path / "train_test_split" / "train_list.txt").open("a") as f:
        f.write("garbage-line\n")
    with pytest.raises(DatasetError, match=r"line 4 of .*train_list\.txt"):
        build_dataset("veriwild-small", tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(DatasetError, match="cuhk03"):
        build_dataset("cuhk03", "/tmp")
    assert set(DATASET_NAMES) == {"market1501", "veri776", "veriwild-small", "veriwild-medium",
                                  "veriwild-large", "synthetic"}
