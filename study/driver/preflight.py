"""Checks a study's data before Ray starts: every dataset its trials use is read once, every trial's
config is checked against it, and the index is handed to the trials.

- :func:`scan` reads a dataset (layout, file names, counts; for VeRi-Wild, whether every listed image
  file exists) into a :class:`~reid_core.data.ReIDDataset`, the *index* the trials then train from.
- :func:`check_batch` checks that a trial's global batch (``data.batch_size``, FastReID's IMS_PER_BATCH)
  splits into equal shares of whole identities over ``--workers-per-trial`` workers.
- :func:`check_trial_data` checks one trial's P x K (global) against the training identities and their
  image counts, and counts queries with no true match in the gallery.
- :func:`check_weights` resolves and verifies each distinct ``model.pretrained`` setting once
  (``imagenet`` fetched into the cache, the file loaded into a CPU backbone) and hands the trials the
  verified local file.
- :func:`preflight` runs both for every distinct (dataset, root, P, K, workers) of a study's trials.
  A dataset root the driver cannot see is read by one small Ray task on a worker node instead
  (:func:`scan_remote`), when the study runs on an existing cluster.

Every failure is a :class:`~study.trial.errors.PreflightError` whose one-line message names the folder,
file or setting and what to change (inside a trial, the same errors follow :mod:`study.trial.errors`).

Ray is imported only by the functions that read on the cluster (:func:`reading_node`, :func:`scan_remote`):
the driver runs the preflight before Ray starts, and a dry run never imports it.

torch is imported only to verify weights (:func:`check_weights` with ``fetch``), never by a dry run.

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

import yaml

from reid_core.config import Config, ConfigError
from reid_core.data import check_global_batch, synthetic
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

def check_batch(cfg: Config, workers: int) -> None:
    """``data.batch_size`` (the global batch of one step) must split into ``workers`` equal shares of whole
    identities of K = ``data.num_instance`` images. Raises PreflightError naming the numbers and the fix
    (:func:`reid_core.data.check_global_batch`'s, with the worker count as the option that sets it)."""
    try:
        check_global_batch(cfg, workers)
    except ConfigError as exc:
        text = re.sub(r"(\d+) worker\(s\)", r"--workers-per-trial \1", str(exc))
        raise PreflightError(f"--workers-per-trial {workers}: {text}") from None


def check_trial_data(facts: DataFacts, cfg: Config, workers: int) -> list[str]:
    """Check one trial config against a dataset. Returns warnings (each at most once per dataset and K);
    raises PreflightError naming the setting and the value that would work.

    ``data.batch_size`` is the global batch of one step (FastReID's IMS_PER_BATCH): P = batch_size / K
    distinct identities over all ``workers``, each worker taking whole identities of it (see
    :func:`check_batch`), so the training identities are checked against the global P."""
    d = cfg.data
    k, p = d.num_instance, d.batch_size // d.num_instance
    ids = facts.train_ids
    if ids == 0:
        raise PreflightError(f"{facts.name}: no training image under {facts.root}")
    if ids < p:
        need = (f"P = data.batch_size / data.num_instance = {d.batch_size} / {k} = {p} distinct identities "
                f"per step (the global batch{f' of {workers} workers' if workers > 1 else ''})")
        fit = (ids // workers) * workers  # P must also split over the workers
        if fit >= 2:
            fix = f"--set data.batch_size={fit * k} (P = {fit})"
        elif workers > 1:
            fix = "fewer --workers-per-trial, or a dataset with more training identities"
        else:
            fix = "a dataset with at least 2 training identities"
        raise PreflightError(f"{facts.name}{' at ' + facts.root if facts.root else ''}: {ids} training identities, "
                             f"fewer than the {need}: use {fix}")
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


# ---- pretrained weights -------------------------------------------------------------------------------

WEIGHTS_SOURCES_ENV = "MOREID_WEIGHTS_SOURCES"
_ARCH_NAME = re.compile(r"^(resnet\d+)(_ibn_a)?$")


def weights_sources() -> dict[tuple[str, bool], Any]:
    """Where ``model.pretrained: imagenet`` fetches from: the official files
    (:data:`reid_core.models.pretrained.OFFICIAL_WEIGHTS`), each replaced by the entry of its architecture
    in the YAML file named by ``$MOREID_WEIGHTS_SOURCES`` when that is set: a site's own copies (a mirror
    URL, or ``file://`` on shared storage), each with the SHA-256 the copy must have, e.g.::

        resnet50_ibn_a: {url: file:///shared/weights/resnet50_ibn_a-d9d0bb7b.pth, sha256: d9d0bb7b2ba34d7e...}
        resnet50: {url: https://mirror.example.org/resnet50-0676ba61.pth, sha256: 0676ba61b6795bbe...}

    Names: ``resnet18`` ... ``resnet101``, ``_ibn_a`` for IBN-a (IBN-Net's file names). Raises
    PreflightError naming the file and the bad entry."""
    from reid_core.models.pretrained import OFFICIAL_WEIGHTS, WeightsSource  # torch: not for a dry run

    sources = dict(OFFICIAL_WEIGHTS)
    path = os.environ.get(WEIGHTS_SOURCES_ENV, "")
    if not path:
        return sources
    where = f"{WEIGHTS_SOURCES_ENV}={path}"
    try:
        entries = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PreflightError(f"{where}: cannot read the weights sources file ({_message(exc)})") from None
    if not isinstance(entries, dict):
        raise PreflightError(f"{where}: expected a mapping of architecture names (resnet50_ibn_a, resnet50, ...) "
                             f"to {{url, sha256}}")
    for name, entry in entries.items():
        match = _ARCH_NAME.match(str(name))
        known = sorted(f"{a}{'_ibn_a' if i else ''}" for a, i in OFFICIAL_WEIGHTS)
        if not match or (match.group(1), bool(match.group(2))) not in OFFICIAL_WEIGHTS:
            raise PreflightError(f"{where}: unknown architecture {name!r} (known: {', '.join(known)})")
        if not isinstance(entry, dict) or set(entry) != {"url", "sha256"}:
            raise PreflightError(f"{where}: {name} must be {{url: ..., sha256: ...}}, got {entry!r}")
        digest = str(entry["sha256"]).lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
            raise PreflightError(f"{where}: {name}.sha256 must be the file's SHA-256 in hex (8 to 64 digits), "
                                 f"got {entry['sha256']!r}")
        sources[(match.group(1), bool(match.group(2)))] = WeightsSource(str(entry["url"]), digest)
    return sources


def weights_key(cfg: Config) -> tuple:
    """What verifying ``model.pretrained`` depends on: the setting, the backbone it loads into, the cache."""
    m = cfg.model
    return (m.pretrained, m.arch, m.ibn, m.non_local, m.non_local_form, m.pretrained_cache)


def backbone_label(cfg: Config, non_local: bool = True) -> str:
    """``R50-IBN-a + non-local``, ``R101``: the architecture as the paper names it (``non_local``: say so)."""
    m = cfg.model
    return f"R{m.arch.removeprefix('resnet')}{'-IBN-a' if m.ibn else ''}" + (
        " + non-local" if m.non_local and non_local else "")


@dataclass
class WeightsCheck:
    """One verified ``model.pretrained`` setting: the local file trials read and the loader's counts
    (:meth:`reid_core.models.pretrained.PretrainedReport.metrics`)."""

    spec: str
    path: str
    metrics: dict[str, Any]


def plan_weights(cfg: Config) -> str:
    """What a run would do about ``cfg``'s weights (a dry run's line: nothing fetched or loaded)."""
    m = cfg.model
    if not m.pretrained:
        if cfg.data.dataset == "synthetic":
            return "pretrained: none (random init)"
        return (f"pretrained: none: random init of {backbone_label(cfg)} (not the paper's setting: the authors "
                f"start from ImageNet weights, model.pretrained: imagenet)")
    if m.pretrained == "imagenet":
        if m.pretrained_cache:
            cache = m.pretrained_cache
        else:
            from reid_core.models.pretrained import default_cache_dir  # imports torch

            cache = str(default_cache_dir())
        return (f"pretrained: imagenet ({backbone_label(cfg, non_local=False)}, fetched once into {cache} and SHA-256 checked "
                f"before the first trial)")
    if m.pretrained == "synthetic":
        return (f"pretrained: synthetic ({backbone_label(cfg, non_local=False)} pretrained on synthetic identities "
                f"disjoint from the study's, made once into the cache when missing, before the first trial)")
    return f"pretrained: {m.pretrained} ({backbone_label(cfg)}, loaded and checked before the first trial)"


def check_weights(cfg: Config, sources: dict[tuple[str, bool], Any]) -> WeightsCheck:
    """Resolve ``cfg.model.pretrained`` (``imagenet``: fetched once from ``sources`` into the cache, SHA-256
    checked; ``synthetic``: made once into the cache) and load it into a CPU backbone of ``cfg``'s architecture, strictly. Raises PreflightError
    with the loader's message (a missing tensor, a shape mismatch, a failed fetch)."""
    from dataclasses import replace

    from reid_core.models import check_pretrained
    from reid_core.pretrain import resolve_weights

    m = cfg.model
    try:
        path = resolve_weights(m.pretrained, m.arch, ibn=m.ibn, cache_dir=m.pretrained_cache or None,
                               sources=sources)
        local = str(Path(path).resolve())
        _, report = check_pretrained(replace(m, pretrained=local))
    except (ConfigError, OSError) as exc:
        raise PreflightError(" ".join(str(exc).split())) from None
    return WeightsCheck(m.pretrained, local, report.metrics())


@dataclass
class Preflight:
    """The outcome: facts per dataset key, the index per key (a ReIDDataset or a Ray object reference;
    absent for synthetic data not generated yet), warnings to print, the keys of datasets left for
    the cluster to read (``deferred``), and the weights: per :func:`weights_key` the verified file
    (``weights``, a real run) or the plan's line (``weights_plan``, a dry run)."""

    facts: dict[str, DataFacts] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    deferred: set[str] = field(default_factory=set)
    weights: dict[tuple, WeightsCheck] = field(default_factory=dict)
    weights_plan: dict[tuple, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        verified = {}
        for check in self.weights.values():  # a setting is kept under its spec and its local file: once
            m = check.metrics
            target = "" if check.spec == check.path else f" -> {check.path}"
            verified[check.path] = (
                f"  pretrained: {check.spec}{target} ({m['pretrained/form']} form; {m['pretrained/loaded']} "
                f"backbone tensors loaded, {m['pretrained/skipped']} skipped, {m['pretrained/missing_non_local']} "
                f"non-local left at init)")
        return ([f"  data: {f.describe()}" for f in self.facts.values()] + self.warnings
                + [f"  data: {key.replace('|', ' at ', 1)}: not visible here; read on a worker node before the "
                   f"first trial" for key in sorted(self.deferred)]
                + [f"  {line}" for line in dict.fromkeys(self.weights_plan.values())] + list(verified.values()))

    def trial_base(self, base: dict[str, Any]) -> dict[str, Any]:
        """A study's flattened base config with ``model.pretrained`` replaced by its verified local file
        (for trials built from the base at run time: Optuna's)."""
        for key, check in self.weights.items():
            if key == (base.get("model.pretrained"), base.get("model.arch"), base.get("model.ibn"),
                       base.get("model.non_local"), base.get("model.non_local_form"),
                       base.get("model.pretrained_cache")):
                return {**base, "model.pretrained": check.path}
        return base


def visible(root: str) -> bool:
    return "://" not in root and Path(root).is_dir()


def preflight(configs: Iterable[Config], workers: int, *, generate: bool, unseen: str = "error",
              done: Preflight | None = None) -> Preflight:
    """Check every config's batch against ``workers``, read every dataset the configs use once and check
    every config against it, then verify each distinct ``model.pretrained`` setting.

    ``generate``: a real run (not a dry run): synthetic data with an empty root are generated into the
    cache now (else, when not cached yet, their counts come from the parameters), and pretrained weights
    are fetched (``imagenet``), loaded into a CPU backbone and verified, each config's ``model.pretrained``
    then set to the verified local file (in place: the plan's Configs are the trials'); without it,
    nothing is fetched or loaded and the plan says what would be. ``unseen``: what to do with a root the
    driver cannot see: ``error``; ``defer`` (recorded in ``deferred``, its configs not checked yet);
    ``remote`` (read by a Ray task on the cluster; Ray must be connected). ``done``: an earlier outcome
    whose datasets and weights are not read again."""
    configs = list(configs)
    for cfg in configs:
        check_batch(cfg, workers)
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
    _weights(configs, out, generate)
    return out


def _weights(configs: list[Config], out: Preflight, verify: bool) -> None:
    """Each distinct weights setting once: verified (``verify``; every config then reads the local file)
    or described (a dry run)."""
    sources = None
    for cfg in configs:
        key = weights_key(cfg)
        if not (verify and cfg.model.pretrained):
            out.weights_plan.setdefault(key, plan_weights(cfg))
            continue
        if key not in out.weights:
            if sources is None:
                sources = weights_sources()
            check = check_weights(cfg, sources)
            out.weights[key] = check
            out.weights[(check.path, *key[1:])] = check  # the configs' setting once rewritten (a second pass)
        cfg.model.pretrained = out.weights[key].path
