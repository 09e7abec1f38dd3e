"""Checks a study's data before Ray starts: every dataset its trials use is read once, every trial's
config is checked against it, and the index is handed to the trials.

- :func:`scan` reads a dataset (layout, file names, counts; for VeRi-Wild, whether every listed image
  file exists) into a :class:`~reid_core.data.ReIDDataset`, the *index* the trials then train from.
- :func:`check_trial_data` checks one trial's P x K against the training identities and their image
  counts, per worker under DDP, and counts queries with no true match in the gallery.
- :func:`preflight` runs both for every distinct (dataset, root, P, K, workers) of a study's trials.
  A dataset root the driver cannot see is read by one small Ray task on a worker node instead
  (:func:`scan_remote`), when the study runs on an existing cluster.

Every failure is a :class:`~study.trial.errors.PreflightError` whose one-line message names the folder,
file or setting and what to change (inside a trial, the same errors follow :mod:`study.trial.errors`).

Ray is imported only by the functions that read on the cluster (:func:`reading_node`, :func:`scan_remote`):
the driver runs the preflight before Ray starts, and a dry run never imports it.

Choice for K above an identity's image count: a warning with the counts, once per dataset and K (the
sampler then draws that identity's images with replacement, so a batch repeats images).
"""
from __future__ import annotations

import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from reid_core.config import Config
from reid_core.data import synthetic
from reid_core.data.datasets import DatasetError, ReIDDataset, build_dataset
from study.space.plan import dataset_key
from study.trial.errors import PreflightError

@dataclass
class DataFacts:
    """What the checks need to know of a dataset (counts only).

    ``images_per_train_id``: image count of each training identity. ``queries`` / ``gallery``: image
    counts; ``unmatched_queries``: queries with no gallery image of their identity from another camera
    (skipped by the evaluation), None when not known (synthetic data not generated yet)."""

    name: str
    root: str
    images_per_train_id: list[int]
    queries: int
    gallery: int
    unmatched_queries: int | None
    scan_s: float = 0.0
    warned_k: set[int] = field(default_factory=set)
    read_on: str = ""  # the Ray node that read it, when the driver could not

    @property
    def train_ids(self) -> int:
        return len(self.images_per_train_id)

    def describe(self) -> str:
        where = f" at {self.root}" if self.root else " (generated at start)"
        text = (f"{self.name}{where}: {sum(self.images_per_train_id)} training images of {self.train_ids} "
                f"identities, {self.queries} queries, {self.gallery} gallery images")
        if self.unmatched_queries:
            text += f"; {self.unmatched_queries} queries have no match in the gallery (skipped by the evaluation)"
        on = f" on worker node {self.read_on}" if self.read_on else ""
        return text + (f" (read in {self.scan_s:.2f} s{on})" if self.scan_s else "")


def facts_of(dataset: ReIDDataset, scan_s: float = 0.0) -> DataFacts:
    counts = Counter(s.pid for s in dataset.train)
    gallery_cams: dict[int, set[int]] = {}
    for s in dataset.gallery:
        gallery_cams.setdefault(s.pid, set()).add(s.camid)
    unmatched = sum(1 for q in dataset.query if not (gallery_cams.get(q.pid, set()) - {q.camid}))
    return DataFacts(dataset.name, dataset.root, sorted(counts.values()), len(dataset.query),
                     len(dataset.gallery), unmatched, scan_s)


# ---- reading ------------------------------------------------------------------------------------------

def scan(name: str, root: str, check_files: bool = True) -> ReIDDataset:
    """Read dataset ``name`` at ``root`` (see :func:`reid_core.data.build_dataset`). For the list-file
    layouts (VeRi-Wild), ``check_files`` also checks that every listed image exists, listing each
    identity folder once. Raises PreflightError naming the missing folder or file."""
    try:
        dataset = build_dataset(name, root)
    except DatasetError as exc:
        raise PreflightError(f"{exc} (fix the folder, or point --data-root at the dataset)") from exc
    if check_files and name.startswith("veriwild"):
        _check_listed_files(dataset)
    for split in ("query", "gallery"):
        if not getattr(dataset, split):
            raise PreflightError(f"{name}: the {split} split under {dataset.root} holds no image: the study "
                                 f"could not evaluate any trial")
    return dataset


def _check_listed_files(dataset: ReIDDataset) -> None:
    listed: dict[str, set[str]] = {}
    for s in (*dataset.train, *dataset.query, *dataset.gallery):
        folder, _, file = s.path.rpartition(os.sep)
        listed.setdefault(folder, set()).add(file)
    missing: list[str] = []
    for folder, files in listed.items():
        try:
            present = set(os.listdir(folder))
        except OSError:
            present = set()
        missing.extend(os.path.join(folder, f) for f in sorted(files - present))
    if missing:
        raise PreflightError(f"{dataset.name}: {len(missing)} image file(s) named in the list files are missing "
                             f"under {dataset.root}, e.g. {missing[0]} (complete the images/ folder or fix the lists)")


def reading_node() -> str | None:
    """A node to read a dataset the driver cannot see: an alive node other than the driver's own (whose
    processes share its view of the files), one that trains (has CPUs) first; None when there is none.
    Left to Ray's default placement, a task that reserves no CPU runs on the driver's node."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    others.sort(key=lambda n: n.get("Resources", {}).get("CPU", 0) <= 0)
    return others[0]["NodeID"] if others else None


def scan_remote(name: str, root: str) -> tuple[Any, DataFacts]:
    """Read a dataset the driver cannot see with one Ray task (no CPU reserved) on another node of the
    cluster (:func:`reading_node`). Returns the index (a Ray object reference, to hand to trials) and its
    facts. Call with Ray connected."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = reading_node()
    if node is None:
        raise PreflightError(f"{name}: folder not found: {root}, and the cluster has no node besides the "
                             f"driver's to read it on (give --data-root a folder this machine sees)")
    placed = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}

    @ray.remote(num_cpus=0, max_retries=0)
    def read(name: str, root: str) -> ReIDDataset:
        return scan(name, root)

    @ray.remote(num_cpus=0, max_retries=0)
    def facts(dataset: ReIDDataset) -> DataFacts:
        return facts_of(dataset)

    began = time.perf_counter()
    ref = read.options(**placed).remote(name, root)
    try:
        found = ray.get(facts.options(**placed).remote(ref))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, PreflightError):
            raise PreflightError(f"on a worker node: {_message(cause)}") from None
        raise
    found.scan_s = time.perf_counter() - began
    found.read_on = node[:8]
    return ref, found


def _message(exc: BaseException) -> str:
    """The last line of an exception raised in a Ray task, without the ``module.Error: `` prefix Ray adds."""
    text = str(exc).strip().splitlines()
    return re.sub(r"^(?:[\w.]+\.)?\w*Error: ", "", text[-1]) if text else type(exc).__name__


def synthetic_facts(cfg: Config) -> DataFacts:
    """Facts of a synthetic dataset not generated yet, from its parameters (see synthetic.generate)."""
    s = cfg.data.synthetic
    test_ids = s.ids - s.ids // 2
    queries = test_ids * (s.cams if s.images_per_id_cam > 1 else 1)
    return DataFacts("synthetic", "", [s.cams * s.images_per_id_cam] * (s.ids // 2), queries,
                     test_ids * s.cams * s.images_per_id_cam - queries, 0)


# ---- checks -----------------------------------------------------------------------------------------

def check_trial_data(facts: DataFacts, cfg: Config, workers: int) -> list[str]:
    """Check one trial config against a dataset. Returns warnings (each at most once per dataset and K);
    raises PreflightError naming the setting and the value that would work."""
    d = cfg.data
    k, p = d.num_instance, d.batch_size // d.num_instance
    ids = facts.train_ids
    if ids == 0:
        raise PreflightError(f"{facts.name}: no training image under {facts.root}")
    per_worker = ids // workers
    if per_worker < p:
        share = f"{ids} training identities" + (f" split over {workers} workers give each {per_worker}"
                                                 if workers > 1 else "")
        need = (f"P = data.batch_size / data.num_instance = {d.batch_size} / {k} = {p} distinct identities "
                f"per batch{' on each worker' if workers > 1 else ''}")
        if per_worker >= 2:
            fix = f"--set data.batch_size={per_worker * k}" + (f" (P = {per_worker})" if workers == 1 else
                                                                f" (P = {per_worker}), or fewer --workers-per-trial")
        elif workers > 1:
            fix = f"--workers-per-trial {max(1, ids // max(p, 2))}"
        else:
            fix = "a dataset with at least 2 training identities"
        raise PreflightError(f"{facts.name}{' at ' + facts.root if facts.root else ''}: {share}, fewer than "
                             f"the {need}: use {fix}")
    if facts.unmatched_queries is not None and facts.queries and facts.unmatched_queries == facts.queries:
        raise PreflightError(f"{facts.name} at {facts.root}: none of its {facts.queries} queries has a match in the "
                             f"gallery (same identity, another camera): check the query and gallery folders")
    warnings = []
    short = [n for n in facts.images_per_train_id if n < k]
    if short and k not in facts.warned_k:
        facts.warned_k.add(k)
        warnings.append(f"warning: {len(short)} of {ids} training identities of {facts.name} have fewer than "
                        f"K = data.num_instance = {k} images (fewest: {min(short)}); their batches repeat "
                        f"images (drawn with replacement). Lower data.num_instance to {min(short)} to avoid it")
    return warnings


@dataclass
class Preflight:
    """The outcome: facts per dataset key, the index per key (a ReIDDataset or a Ray object reference;
    absent for synthetic data not generated yet), warnings to print, and the keys of datasets left for
    the cluster to read (``deferred``)."""

    facts: dict[str, DataFacts] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    deferred: set[str] = field(default_factory=set)

    def lines(self) -> list[str]:
        return ([f"  data: {f.describe()}" for f in self.facts.values()] + self.warnings
                + [f"  data: {key.replace('|', ' at ', 1)}: not visible here; read on a worker node before the "
                   f"first trial" for key in sorted(self.deferred)])


def visible(root: str) -> bool:
    return "://" not in root and Path(root).is_dir()


def preflight(configs: Iterable[Config], workers: int, *, generate: bool, unseen: str = "error",
              done: Preflight | None = None) -> Preflight:
    """Read every dataset the configs use once and check every config against it.

    ``generate``: synthetic data with an empty root are generated into the cache now (else, when not
    cached yet, their counts come from the parameters). ``unseen``: what to do with a root the driver
    cannot see: ``error``; ``defer`` (recorded in ``deferred``, its configs not checked yet); ``remote``
    (read by a Ray task on the cluster; Ray must be connected). ``done``: an earlier outcome whose
    datasets are not read again."""
    out = done or Preflight()
    out.deferred = set()
    seen: set[tuple[str, int, int]] = set()
    for cfg in configs:
        key = dataset_key(cfg)
        if key not in out.facts:
            name, root = cfg.data.dataset, cfg.data.root
            if name == "synthetic" and not root:
                cached = synthetic.cache_root() / "synthetic" / synthetic.cache_key(cfg.data.synthetic)
                if generate or (cached / synthetic.META_FILE).is_file():
                    root = str(synthetic.ensure(cfg.data.synthetic))
                else:
                    out.facts[key] = synthetic_facts(cfg)
            if key not in out.facts:
                if visible(root):
                    began = time.perf_counter()
                    dataset = scan(name, root)
                    out.facts[key] = facts_of(dataset, time.perf_counter() - began)
                    out.index[key] = dataset
                elif unseen == "remote":
                    out.index[key], out.facts[key] = scan_remote(name, root)
                elif unseen == "defer":
                    out.deferred.add(key)
                    continue
                else:
                    raise PreflightError(f"{name}: folder not found: {root} (give the dataset folder with "
                                         f"--data-root; a folder only the cluster's nodes see needs --address)")
        trial_key = (key, cfg.data.batch_size, cfg.data.num_instance)
        if trial_key not in seen:
            seen.add(trial_key)
            out.warnings.extend(check_trial_data(out.facts[key], cfg, workers))
    return out
