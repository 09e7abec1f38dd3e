"""Pretrained backbone weights a user can trust: fetched once and SHA-256 checked, loaded strictly.

``model.pretrained`` is one of

* ``""``: random initialization;
* a local file: a state dict in torchvision or IBN-Net form (``conv1.weight``, ``layer1.0.bn1.IN.weight``,
  ``fc.*``), or with FastReID's / reid_core's ``backbone.`` prefix; wrapped or not in ``{"model": ...}`` /
  ``{"state_dict": ...}``, with or without DataParallel's ``module.`` prefix;
* ``imagenet``: the official ImageNet file of the architecture (:data:`OFFICIAL_WEIGHTS`: torchvision's
  for plain ResNets, IBN-Net's release for IBN-a), fetched once into a cache folder by
  :func:`resolve_pretrained`.

A study's driver resolves the setting before any trial starts, so trials read a verified local file.
Loading (:func:`load_pretrained`) is strict: a backbone tensor the file lacks (other than the non-local
blocks, which the ImageNet files cannot have), a file tensor the backbone lacks (other than the ImageNet
classifier ``fc.*`` and, in the ``backbone.``-prefixed form, everything outside the backbone) and a shape
mismatch are errors naming the tensors. Files are read with ``torch.load(weights_only=True)``: nothing
is unpickled.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from reid_core.config import ConfigError

log = logging.getLogger(__name__)

NON_LOCAL_PREFIXES = ("layer2_nl.", "layer3_nl.")  # our names of the non-local blocks
# FastReID's backbone names its non-local blocks NL_<stage>.<i>; ours are layer<stage>_nl.<i>, same order.
FASTREID_NON_LOCAL = {"NL_2.": "layer2_nl.", "NL_3.": "layer3_nl."}


class PretrainedError(ConfigError):
    """A ``model.pretrained`` setting that cannot be used (a file that does not fit, a failed fetch)."""


@dataclass(frozen=True)
class WeightsSource:
    """An official weights file: its URL and SHA-256.

    ``sha256`` is the full hex digest where one is published, else the hex prefix the publisher put in
    the file name (torch.hub's convention, checked the way ``torch.hub``'s ``check_hash`` does).
    """

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def full_digest(self) -> bool:
        return len(self.sha256) == 64

    def matches(self, digest: str) -> bool:
        return digest.lower().startswith(self.sha256.lower())


_TORCHVISION = "https://download.pytorch.org/models/"
_IBN_NET = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/"
# (arch, ibn) -> official ImageNet file. Plain ResNets: torchvision's IMAGENET1K_V1 weights (the classic
# ImageNet training that FastReID loaded; torchvision's file names carry the first 8 hex digits of the
# SHA-256). IBN-a: IBN-Net's v1.0 release, as FastReID's ``PRETRAIN`` fetches. Full digests are those
# published with pins of these very files and agree with the name's prefix; where none was found
# (IBN-Net ResNet-18/34/101-a) only the prefix in the official file name is checked.
OFFICIAL_WEIGHTS: dict[tuple[str, bool], WeightsSource] = {
    ("resnet18", False): WeightsSource(
        _TORCHVISION + "resnet18-f37072fd.pth", "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
    ("resnet34", False): WeightsSource(
        _TORCHVISION + "resnet34-b627a593.pth", "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f"),
    ("resnet50", False): WeightsSource(
        _TORCHVISION + "resnet50-0676ba61.pth", "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"),
    ("resnet101", False): WeightsSource(
        _TORCHVISION + "resnet101-63fe2227.pth", "63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a"),
    ("resnet18", True): WeightsSource(_IBN_NET + "resnet18_ibn_a-2f571257.pth", "2f571257"),  # prefix only
    ("resnet34", True): WeightsSource(_IBN_NET + "resnet34_ibn_a-94bc1577.pth", "94bc1577"),  # prefix only
    ("resnet50", True): WeightsSource(
        _IBN_NET + "resnet50_ibn_a-d9d0bb7b.pth", "d9d0bb7b2ba34d7e6e12c4616c9d233914762e49fbb9fcb49d7f4d65da6f759c"),
    ("resnet101", True): WeightsSource(_IBN_NET + "resnet101_ibn_a-59ea0ac6.pth", "59ea0ac6"),  # prefix only
}


@dataclass(frozen=True)
class PretrainedReport:
    """What :func:`load_pretrained` loaded into a backbone (counts of tensors)."""

    path: str  # the file read
    form: str  # torchvision | ibn-net | backbone-prefixed (FastReID or reid_core checkpoint)
    loaded: int  # backbone tensors taken from the file
    skipped: int  # file tensors outside the backbone: the ImageNet classifier fc.*, FastReID heads.* ...
    missing_non_local: int  # non-local tensors the file lacks (left at their init: identity blocks)

    def metrics(self) -> dict[str, int | str]:
        """Flat ``pretrained/...`` entries for a trial's first result and results.csv."""
        return {f"pretrained/{key}": value for key, value in asdict(self).items()}


# ---- fetching --------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$MOREID_CACHE/weights``, else ``~/.cache/moreid/weights``."""
    return Path(os.environ.get("MOREID_CACHE") or Path.home() / ".cache" / "moreid") / "weights"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_weights(source: WeightsSource, cache_dir: str | os.PathLike, timeout: float = 60.0) -> Path:
    """``cache_dir / source.filename``, downloaded first unless already there and matching its checksum.

    The download goes to a temporary file in ``cache_dir`` and is renamed into place only once its
    SHA-256 matches, so the cache never holds a partial or wrong file. Raises :class:`PretrainedError`
    when the URL cannot be read or the checksum differs (nothing is cached then).
    """
    cache = Path(cache_dir).expanduser()
    target = cache / source.filename
    if target.is_file():
        if source.matches(sha256_file(target)):
            return target
        log.warning("cached weights %s fail their SHA-256 check; fetching them again", target)
        target.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.filename}.", suffix=".part", dir=cache)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(source.url, timeout=timeout) as response:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                raise PretrainedError(
                    f"model.pretrained: could not download {source.url} ({reason}). Download it yourself, check "
                    f"that its SHA-256 starts with {source.sha256}, and set model.pretrained to the file") from exc
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if not source.matches(got):
            kind = "SHA-256" if source.full_digest else "SHA-256 prefix (from the official file name)"
            raise PretrainedError(f"model.pretrained: {source.url} has SHA-256 {got}, not the expected {kind} "
                                  f"{source.sha256}; nothing was cached in {cache}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("fetched %s into %s (SHA-256 checked)", source.url, target)
    return target


def resolve_pretrained(spec: str, arch: str, *, ibn: bool, cache_dir: str | os.PathLike | None = None,
                       sources: Mapping[tuple[str, bool], WeightsSource] = OFFICIAL_WEIGHTS) -> Path | None:
    """The local file that ``model.pretrained = spec`` means, or None for random initialization.

    ``imagenet`` fetches (once) the official file for ``arch`` / ``ibn`` into ``cache_dir`` (default
    :func:`default_cache_dir`); a path must name an existing file. ``synthetic`` (a backbone pretrained on
    synthetic identities) is :func:`reid_core.pretrain.resolve_weights`'s. Call it in a study's driver before the
    trials start and hand the trials the returned path.
    """
    if not spec:
        return None
    if spec == "synthetic":
        # Made by a training run, which sits above the models (reid_core.pretrain imports them).
        raise PretrainedError("model.pretrained: synthetic is made by reid_core.pretrain: resolve it with "
                              "reid_core.pretrain.resolve_weights (the trainer and the study's driver do)")
    if spec == "imagenet":
        source = sources.get((arch, bool(ibn)))
        if source is None:
            kind = f"{arch}{' IBN-a' if ibn else ''}"
            raise PretrainedError(f"model.pretrained: no official ImageNet weights known for {kind}; "
                                  f"give a local weights file instead")
        return fetch_weights(source, cache_dir or default_cache_dir())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file not found: {path}")
    return path


# ---- loading ---------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped from ``{"model": ...}`` / ``{"state_dict": ...}`` and with
    ``module.`` prefixes removed. Raises FileNotFoundError, or PretrainedError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file it cannot read
        raise PretrainedError(f"model.pretrained: {path} is not a PyTorch state dict file readable with "
                              f"weights_only=True ({exc})") from exc
    while isinstance(state, Mapping):
        inner = next((state[k] for k in ("model", "state_dict") if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not (isinstance(state, Mapping) and state
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())):
        raise PretrainedError(f"model.pretrained: {path} does not hold a state dict "
                              f"(a non-empty mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(backbone: nn.Module, path: str | os.PathLike) -> PretrainedReport:
    """Load the weights file ``path`` into ``backbone`` strictly (see the module docstring).

    Missing ``num_batches_tracked`` counters are not an error (older files lack them). Raises
    FileNotFoundError if ``path`` is not a file and :class:`PretrainedError` if it does not fit, naming
    the tensors; the backbone is left untouched then.
    """
    path = Path(path)
    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state):
        form = "backbone-prefixed"
        tensors = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        for theirs, ours in FASTREID_NON_LOCAL.items():
            tensors = {ours + k.removeprefix(theirs) if k.startswith(theirs) else k: v for k, v in tensors.items()}
        skipped = len(state) - len(tensors)
    else:
        form = "ibn-net" if any(".bn1.IN." in k for k in state) else "torchvision"
        tensors = {k: v for k, v in state.items() if not k.startswith("fc.")}
        skipped = len(state) - len(tensors)

    own = backbone.state_dict()
    non_local = [k for k in own if k.startswith(NON_LOCAL_PREFIXES)]
    missing = [k for k in own if k not in tensors and k not in non_local and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in own]
    mismatched = [f"{k} (file {tuple(v.shape)}, backbone {tuple(own[k].shape)})"
                  for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"the file lacks {len(missing)} backbone tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"the backbone has no place for {len(unexpected)} tensors of the file: {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors differ in shape: {_names(mismatched)}")
    if problems:
        raise PretrainedError(f"model.pretrained: {path} ({form} form) does not fit the {_describe(backbone)} "
                              f"backbone: {'; '.join(problems)}{_hint(missing, unexpected)}")
    result = backbone.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report = PretrainedReport(path=str(path), form=form, loaded=len(tensors), skipped=skipped,
                              missing_non_local=sum(k not in tensors for k in non_local))
    log.info("loaded %d backbone tensors from %s (%s form; %d outside the backbone skipped, %d non-local "
             "tensors left at their init)", report.loaded, path, form, report.skipped, report.missing_non_local)
    return report


def _names(keys: list[str], shown: int = 6) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys)} in all)" if len(keys) > shown else "")


def _describe(backbone: nn.Module) -> str:
    arch = getattr(backbone, "arch", type(backbone).__name__)
    ibn = any(type(m).__name__ == "IBN" for m in backbone.modules())
    return f"{arch}{' IBN-a' if ibn else ''}"


def _hint(missing: list[str], unexpected: list[str]) -> str:
    if any(".bn1.IN." in k or ".bn1.BN." in k for k in missing) and any(k.endswith(".bn1.weight") for k in unexpected):
        return (". The file is a plain ResNet's and the backbone is IBN-a, whose instance norms it cannot fill: use "
                "IBN-Net's ImageNet file (model.pretrained: imagenet fetches it) or set model.ibn: false")
    if any(".bn1.IN." in k for k in unexpected):
        return ". The file is an IBN-a network's: set model.ibn: true, or use a plain ResNet file"
    return ""
