"""Readers of re-ID datasets laid out on disk (nothing is downloaded).

Every reader returns a :class:`ReIDDataset`: three lists of :class:`Sample` (train, query, gallery) with
person/vehicle ids as written in the file names and camera ids made 0-based. Layouts are those of
docs/design.md, "Data". A missing folder or list file, or a file name that does not parse, raises
:class:`DatasetError` naming it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from reid_core.config import DataConfig

logger = logging.getLogger("reid_core.data")

SPLITS = ("train", "query", "gallery")


class DatasetError(ValueError):
    """A dataset folder, list file or file name that cannot be read; the message names it."""


class Sample(NamedTuple):
    """One image: its path, its identity as in the file name, its 0-based camera."""

    path: str
    pid: int
    camid: int


@dataclass
class ReIDDataset:
    """A re-ID dataset: training images and the query/gallery test protocol."""

    name: str
    root: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    _summary: dict[str, dict[str, int]] | None = field(default=None, init=False, repr=False)

    @property
    def num_train_pids(self) -> int:
        """Distinct identities in the training split."""
        return len({s.pid for s in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({s.camid for s in self.train})

    def summary(self) -> dict[str, dict[str, int]]:
        """``{split: {"images": n, "ids": n, "cams": n}}`` for train, query and gallery."""
        if self._summary is None:
            self._summary = {
                split: {
                    "images": len(samples),
                    "ids": len({s.pid for s in samples}),
                    "cams": len({s.camid for s in samples}),
                }
                for split, samples in zip(SPLITS, (self.train, self.query, self.gallery))
            }
        return self._summary

    def describe(self) -> str:
        """The summary as a small table (what the reader logs)."""
        lines = [f"dataset {self.name} at {self.root}", f"  {'split':<8}{'images':>9}{'ids':>8}{'cams':>6}"]
        for split, c in self.summary().items():
            lines.append(f"  {split:<8}{c['images']:>9}{c['ids']:>8}{c['cams']:>6}")
        return "\n".join(lines)


# ---- helpers ----------------------------------------------------------------

def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what}: folder not found: {path}")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what}: list file not found: {path}")
    return path


def _jpegs(folder: Path) -> list[Path]:
    """The .jpg files of a folder, sorted by name (other files, e.g. Thumbs.db, are ignored)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())


def _parse_folder(folder: Path, pattern: re.Pattern[str], dataset: str,
                  keep: Callable[[int], bool] = lambda pid: True) -> list[Sample]:
    """Samples of every JPEG in ``folder`` whose name matches ``pattern`` (groups ``pid``, ``cam``)."""
    samples = []
    for path in _jpegs(folder):
        match = pattern.fullmatch(path.name)
        if match is None:
            raise DatasetError(f"{dataset}: cannot parse image file name {path} "
                               f"(expected a name like {pattern.pattern!r})")
        pid, cam = int(match["pid"]), int(match["cam"])
        if cam < 1:
            raise DatasetError(f"{dataset}: camera number must start at 1 in {path}")
        if keep(pid):
            samples.append(Sample(str(path), pid, cam - 1))
    return samples


# ---- Market-1501 --------------------------------------------------------------

_MARKET_NAME = re.compile(r"(?P<pid>-?\d+)_c(?P<cam>\d+)s\d+_\d+_\d+\.jpg", re.IGNORECASE)


def read_market1501(root: str | Path, name: str = "market1501") -> ReIDDataset:
    """Market-1501: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (optionally under
    ``Market-1501-v15.09.15/``). Id -1 (junk) is skipped; id 0 (distractors) is kept."""
    root = _require_dir(Path(root), name)
    base = root / "Market-1501-v15.09.15"
    if not (root / "bounding_box_train").is_dir() and base.is_dir():
        root = base
    not_junk = lambda pid: pid != -1  # noqa: E731
    train = _parse_folder(_require_dir(root / "bounding_box_train", name), _MARKET_NAME, name, not_junk)
    query = _parse_folder(_require_dir(root / "query", name), _MARKET_NAME, name, not_junk)
    gallery = _parse_folder(_require_dir(root / "bounding_box_test", name), _MARKET_NAME, name, not_junk)
    return ReIDDataset(name, str(root), train, query, gallery)


# ---- VeRi-776 -------------------------------------------------------------------

_VERI_NAME = re.compile(r"(?P<pid>\d+)_c(?P<cam>\d+)_\d+_\d+\.jpg", re.IGNORECASE)


def read_veri776(root: str | Path, name: str = "veri776") -> ReIDDataset:
    """VeRi-776: ``image_train/``, ``image_query/``, ``image_test/`` (the gallery)."""
    root = _require_dir(Path(root), name)
    train = _parse_folder(_require_dir(root / "image_train", name), _VERI_NAME, name)
    query = _parse_folder(_require_dir(root / "image_query", name), _VERI_NAME, name)
    gallery = _parse_folder(_require_dir(root / "image_test", name), _VERI_NAME, name)
    return ReIDDataset(name, str(root), train, query, gallery)


# ---- VeRi-Wild ------------------------------------------------------------------

VERIWILD_SIZES = {"small": 3000, "medium": 5000, "large": 10000}


def _read_vehicle_info(path: Path) -> dict[str, int]:
    """``vid/imgid`` -> camera number as written, from ``vehicle_info.txt`` (one header line)."""
    cams: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        next(f, None)  # header
        for lineno, line in enumerate(f, start=2):
            line = line.strip()
            if not line:
                continue
            parts = line.split(";")
            if len(parts) < 2 or "/" not in parts[0] or not parts[1].strip().isdigit():
                raise DatasetError(f"veriwild: cannot parse line {lineno} of {path}: {line!r} "
                                   "(expected 'vid/imgid;camid;...')")
            cams[parts[0].strip()] = int(parts[1])
    return cams


def _read_veriwild_list(path: Path, images: Path, cam_index: dict[str, int], name: str) -> list[Sample]:
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            key = line.strip()
            if not key:
                continue
            vid, _, img = key.partition("/")
            if not vid.isdigit() or not img:
                raise DatasetError(f"{name}: cannot parse line {lineno} of {path}: {key!r} (expected 'vid/imgid')")
            if key not in cam_index:
                raise DatasetError(f"{name}: image {key!r} (line {lineno} of {path}) is not in vehicle_info.txt")
            img_file = img if img.lower().endswith(".jpg") else f"{img}.jpg"
            samples.append(Sample(str(images / vid / img_file), int(vid), cam_index[key]))
    return samples


def read_veriwild(root: str | Path, size: str, name: str | None = None) -> ReIDDataset:
    """VeRi-Wild with the ``small`` / ``medium`` / ``large`` test subset (3,000 / 5,000 / 10,000 ids).

    Camera ids of ``vehicle_info.txt`` are mapped to 0..C-1 in ascending numeric order, so that they are
    0-based whatever the first camera's number is.
    """
    if size not in VERIWILD_SIZES:
        raise DatasetError(f"veriwild: unknown test size {size!r} (one of {', '.join(VERIWILD_SIZES)})")
    name = name or f"veriwild-{size}"
    root = _require_dir(Path(root), name)
    images = _require_dir(root / "images", name)
    split_dir = _require_dir(root / "train_test_split", name)
    n = VERIWILD_SIZES[size]
    train_list = _require_file(split_dir / "train_list.txt", name)
    gallery_list = _require_file(split_dir / f"test_{n}.txt", name)
    query_list = _require_file(split_dir / f"test_{n}_query.txt", name)
    info = next((p for p in (split_dir / "vehicle_info.txt", root / "vehicle_info.txt") if p.is_file()), None)
    if info is None:
        raise DatasetError(f"{name}: list file not found: {split_dir / 'vehicle_info.txt'} "
                           f"(nor {root / 'vehicle_info.txt'})")
    raw_cams = _read_vehicle_info(info)
    order = {cam: i for i, cam in enumerate(sorted(set(raw_cams.values())))}
    cam_index = {key: order[cam] for key, cam in raw_cams.items()}
    train = _read_veriwild_list(train_list, images, cam_index, name)
    query = _read_veriwild_list(query_list, images, cam_index, name)
    gallery = _read_veriwild_list(gallery_list, images, cam_index, name)
    return ReIDDataset(name, str(root), train, query, gallery)


# ---- synthetic --------------------------------------------------------------------

def read_synthetic(root: str | Path) -> ReIDDataset:
    """A folder written by :mod:`reid_core.data.synthetic`, in Market-1501 or VeRi-776 layout (detected)."""
    if not str(root):
        raise DatasetError("synthetic: empty root; pass the folder written by reid_core.data.synthetic "
                           "(or use reid_core.data.load_dataset, which generates it into the cache)")
    path = _require_dir(Path(root), "synthetic")
    if (path / "bounding_box_train").is_dir():
        return read_market1501(path, name="synthetic")
    if (path / "image_train").is_dir():
        return read_veri776(path, name="synthetic")
    raise DatasetError(f"synthetic: {path} holds neither bounding_box_train/ (market1501 layout) "
                       "nor image_train/ (veri776 layout)")


# ---- entry point -------------------------------------------------------------------

_READERS: dict[str, Callable[[str | Path], ReIDDataset]] = {
    "market1501": read_market1501,
    "veri776": read_veri776,
    "veriwild-small": lambda root: read_veriwild(root, "small"),
    "veriwild-medium": lambda root: read_veriwild(root, "medium"),
    "veriwild-large": lambda root: read_veriwild(root, "large"),
    "synthetic": read_synthetic,
}

DATASET_NAMES: Sequence[str] = tuple(_READERS)


def build_dataset(name: str, root: str | Path) -> ReIDDataset:
    """Read dataset ``name`` (one of :data:`DATASET_NAMES`) from ``root`` and log its counts."""
    if name not in _READERS:
        raise DatasetError(f"unknown dataset {name!r} (one of {', '.join(DATASET_NAMES)})")
    dataset = _READERS[name](root)
    if not dataset.train:
        raise DatasetError(f"{name}: no training images found under {dataset.root}")
    logger.info("%s", dataset.describe())
    return dataset


def load_dataset(cfg: DataConfig) -> ReIDDataset:
    """The dataset a :class:`~reid_core.config.DataConfig` names. For ``synthetic`` with an empty
    ``root``, the data are generated once into the cache (:func:`reid_core.data.synthetic.ensure`)."""
    from reid_core.data import synthetic  # the generator is only needed here

    root: str | Path = cfg.root
    if cfg.dataset == "synthetic" and not root:
        root = synthetic.ensure(cfg.synthetic)
    return build_dataset(cfg.dataset, root)
