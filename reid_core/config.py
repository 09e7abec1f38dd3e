"""Typed, validated experiment configuration.

A config is a tree of dataclasses. It is built from a nested dict (YAML) with
:meth:`Config.from_dict`, which rejects unknown keys by their dotted name, and
checked by :meth:`Config.validate`, which rejects impossible values by name.
``--set key=value`` overrides use dotted names (``loss.alpha=1.2``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


DATASETS = ("synthetic", "market1501", "veri776", "veriwild-small", "veriwild-medium", "veriwild-large")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
LOSSES = ("triplet", "npair", "ranked_list", "he")
DISTANCES = ("euclidean", "cosine")
EVAL_METRICS = ("mAP", "R1", "R5", "R10", "mINP")  # what an evaluation reports (percent)
FRAMEWORKS = ("baseline", "moreid")
NON_LOCAL_FORMS = ("dot_product", "embedded_gaussian")
AMP_DTYPES = ("float16", "bfloat16")


@dataclass
class SyntheticConfig:
    """Shape of the generated dataset (only used when ``data.dataset == 'synthetic'``)."""

    layout: str = "market1501"  # market1501 | veri776
    ids: int = 60  # identities in total; half train, half test (disjoint)
    cams: int = 4
    images_per_id_cam: int = 3
    height: int = 64  # pixels of the written JPEGs
    width: int = 32
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str = ""  # dataset folder; for synthetic, empty means the cache folder
    height: int = 256  # network input, pixels
    width: int = 256
    batch_size: int = 64  # P x K images per optimizer step, all processes together (the global batch)
    num_instance: int = 16  # K, images per identity in a batch
    workers: int = 2  # DataLoader worker processes
    flip_prob: float = 0.5
    padding: int = 10  # pad-and-crop, pixels
    random_erasing: float = 0.5  # probability
    autoaug: bool = False
    autoaug_prob: float = 0.1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    last_stride: int = 1
    ibn: bool = False
    non_local: bool = False
    non_local_form: str = "dot_product"  # dot_product (FastReID's, the authors') | embedded_gaussian
    pooling: str = "gem"  # gem | avg
    gem_p: float = 3.0
    # "" = random init; a local file (torchvision, IBN-Net or FastReID form); or "imagenet": the official
    # ImageNet file for arch/ibn, fetched once into pretrained_cache and SHA-256 checked; or "synthetic":
    # pretrained here on synthetic identities (reid_core.pretrain), made once into pretrained_cache
    pretrained: str = ""
    pretrained_cache: str = ""  # folder of fetched weights; empty = $MOREID_CACHE/weights or ~/.cache/moreid/weights
    test_feature: str = "after_bn"  # before_bn | after_bn (BNNeck)
    classifier: str = "linear"  # linear | circle (CircleSoftmax, the authors' recipes)
    cls_scale: float = 64.0  # CircleSoftmax scale s
    cls_margin: float = 0.35  # CircleSoftmax margin m, in [0, 1)


@dataclass
class LossConfig:
    """The metric loss and its knobs; only the chosen loss's knobs are used."""

    name: str = "he"
    distance: str = "euclidean"
    normalize: bool = False  # L2-normalize features before the distance
    metric_weight: float = 1.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.1
    # triplet
    margin: float = 0.3  # 0 = soft margin (softplus)
    triplet_mining: str = "hard"  # hard (batch-hard) | weighted (FastReID: softmax-weighted sets)
    # npair
    k: int = 15
    # ranked_list
    alpha: float = 1.2
    beta: float = 0.4
    tn: float = 10.0
    imbalance: float = 0.5
    # he (the paper's equation; defaults = the authors' config). Our extensions, off by default:
    he_margin: float = 0.0  # margin inside each (positive, negative) pair
    he_scale: float = 1.0  # multiplies the loss
    he_norm: str = "none"  # none (the paper's sum) | elastic (/ elastic count) | positives (/ |P|)

    # loss name -> {config field: keyword argument of build_loss}
    KNOBS: ClassVar[dict[str, dict[str, str]]] = {
        "triplet": {"margin": "margin", "triplet_mining": "mining"},
        "npair": {"k": "k"},
        "ranked_list": {"alpha": "alpha", "beta": "beta", "tn": "tn", "imbalance": "imbalance"},
        "he": {"he_margin": "margin", "he_scale": "scale", "he_norm": "norm"},
    }

    def params(self) -> dict[str, Any]:
        """Keyword arguments of ``reid_core.losses.build_loss`` for the chosen loss."""
        return {arg: getattr(self, key) for key, arg in self.KNOBS[self.name].items()}


@dataclass
class FrameworkConfig:
    name: str = "moreid"  # baseline | moreid
    momentum: float = 0.997  # m in theta_k <- m theta_k + (1 - m) theta_q
    dict_size: int = 8192  # S, keys in the dictionary
    include_past_positives: bool = False  # supplementary C ablation
    test_encoder: str = "query"  # query (f_q) | key (f_k): which encoder gives test features


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd (Nesterov)
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD only
    warmup_iters: int = 0
    warmup_factor: float = 0.1
    freeze_iters: int = 0  # backbone frozen (heads train) for these first iterations
    cosine_delay_epochs: int = 0  # constant lr for these epochs, then cosine annealing
    eta_min: float = 7.7e-7
    grad_clip: float = 0.0  # max grad norm; 0 = off


@dataclass
class TrainConfig:
    epochs: int = 60
    iters_per_epoch: int = 0  # 0 = one pass over the training images
    eval_period: int = 10  # epochs between evaluations (the last epoch is always evaluated)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # on CUDA only
    amp_dtype: str = "float16"  # float16 (with a GradScaler) | bfloat16 (no scaler); losses, keys stay float32
    channels_last: bool = True  # on CUDA only; IBN-a blocks return to the default layout (see models.IBN)
    cudnn_benchmark: bool = True  # on CUDA only: torch.backends.cudnn.benchmark (autotuned convolutions)
    compile: bool = False  # torch.compile the backbones (f_q, and f_k for MoReID)
    log_every: int = 20  # iterations between TensorBoard step scalars
    output_dir: str = "runs/default"
    checkpoint_period: int = 1  # epochs


@dataclass
class EvalConfig:
    metric: str = "euclidean"  # euclidean | cosine
    flip: bool = False  # average features of the image and its mirror
    max_rank: int = 50
    chunk_size: int = 0  # queries per chunk; 0 = derived from memory_budget_mb
    memory_budget_mb: int = 1024
    batch_size: int = 128
    rerank: bool = False  # also report k-reciprocal re-ranked metrics (mAP_rerank, ...)
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3  # weight of the original distance
    query_expansion: bool = False  # alpha-weighted average query expansion of the features first
    qe_k: int = 10
    qe_alpha: float = 3.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    framework: FrameworkConfig = field(default_factory=FrameworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- construction -------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Config":
        """Build a config from a nested mapping; unknown keys raise :class:`ConfigError`."""
        return _build(cls, data or {}, prefix="")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Iterable[str] = ()) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        return cls.from_dict(apply_overrides(raw, overrides)).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: Mapping[str, Any]) -> "Config":
        """A validated copy with dotted-key overrides applied (``{"loss.k": 5}``)."""
        tree = self.to_dict()
        for key, value in overrides.items():
            set_dotted(tree, key, value)
        return Config.from_dict(tree).validate()

    # ---- validation ---------------------------------------------------
    def validate(self) -> "Config":
        """Check every value; raise :class:`ConfigError` naming the first bad one. Returns self."""
        d, m, l, f, o, t, e = self.data, self.model, self.loss, self.framework, self.optim, self.train, self.eval
        _choice("data.dataset", d.dataset, DATASETS)
        _choice("data.synthetic.layout", d.synthetic.layout, ("market1501", "veri776"))
        for name in ("data.height", "data.width", "data.batch_size", "data.num_instance",
                     "data.synthetic.ids", "data.synthetic.cams", "data.synthetic.images_per_id_cam",
                     "data.synthetic.height", "data.synthetic.width",
                     "train.epochs", "train.eval_period", "train.log_every", "train.checkpoint_period",
                     "eval.max_rank", "eval.memory_budget_mb", "eval.batch_size", "eval.rerank_k1",
                     "eval.rerank_k2", "eval.qe_k"):
            _positive(name, _get(self, name))
        if d.batch_size % d.num_instance:
            raise ConfigError(f"data.batch_size ({d.batch_size}) must be a multiple of "
                              f"data.num_instance ({d.num_instance})")
        if d.batch_size // d.num_instance < 2:
            raise ConfigError("data.batch_size / data.num_instance must give at least 2 identities per batch")
        if d.synthetic.ids < 4:
            raise ConfigError(f"data.synthetic.ids must be at least 4, got {d.synthetic.ids}")
        _nonneg("data.workers", d.workers)
        _nonneg("data.padding", d.padding)
        for name in ("data.flip_prob", "data.random_erasing", "data.autoaug_prob"):
            _prob(name, _get(self, name))
        _choice("model.arch", m.arch, ARCHS)
        _choice("model.last_stride", m.last_stride, (1, 2))
        _choice("model.pooling", m.pooling, ("gem", "avg"))
        _choice("model.test_feature", m.test_feature, ("before_bn", "after_bn"))
        _positive("model.gem_p", m.gem_p)
        _choice("model.classifier", m.classifier, ("linear", "circle"))
        _positive("model.cls_scale", m.cls_scale)
        if not 0 <= m.cls_margin < 1:
            raise ConfigError(f"model.cls_margin must be in [0, 1), got {m.cls_margin}")
        _choice("model.non_local_form", m.non_local_form, NON_LOCAL_FORMS)
        if m.pretrained and m.pretrained not in ("imagenet", "synthetic") and not Path(m.pretrained).is_file():
            raise ConfigError(f"model.pretrained must be '', 'imagenet', 'synthetic' or a weights file; file not found: "
                              f"{m.pretrained}")
        if m.pretrained_cache and Path(m.pretrained_cache).exists() and not Path(m.pretrained_cache).is_dir():
            raise ConfigError(f"model.pretrained_cache must be a folder, got the file {m.pretrained_cache}")
        _choice("loss.name", l.name, LOSSES)
        _choice("loss.distance", l.distance, DISTANCES)
        _choice("loss.triplet_mining", l.triplet_mining, ("hard", "weighted"))
        _choice("loss.he_norm", l.he_norm, ("none", "elastic", "positives"))
        for name in ("loss.metric_weight", "loss.ce_weight", "loss.margin", "loss.he_margin"):
            _nonneg(name, _get(self, name))
        _positive("loss.he_scale", l.he_scale)
        if l.label_smoothing < 0 or l.label_smoothing >= 1:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {l.label_smoothing}")
        if l.k < 1:
            raise ConfigError(f"loss.k must be at least 1, got {l.k}")
        _positive("loss.alpha", l.alpha)
        _positive("loss.beta", l.beta)
        if l.beta >= l.alpha:
            raise ConfigError(f"loss.beta ({l.beta}) must be smaller than loss.alpha ({l.alpha})")
        _prob("loss.imbalance", l.imbalance)
        _nonneg("loss.tn", l.tn)
        _choice("framework.name", f.name, FRAMEWORKS)
        if not 0.0 < f.momentum < 1.0:
            raise ConfigError(f"framework.momentum must be in (0, 1), got {f.momentum}")
        _positive("framework.dict_size", f.dict_size)
        _choice("framework.test_encoder", f.test_encoder, ("query", "key"))
        if f.name == "baseline" and f.test_encoder == "key":
            raise ConfigError("framework.test_encoder 'key' needs framework.name 'moreid' (the baseline has no f_k)")
        _choice("optim.name", o.name, ("adam", "sgd"))
        _positive("optim.lr", o.lr)
        for name in ("optim.weight_decay", "optim.momentum", "optim.warmup_iters", "optim.freeze_iters",
                     "optim.cosine_delay_epochs", "optim.eta_min", "optim.grad_clip"):
            _nonneg(name, _get(self, name))
        if not 0 < o.warmup_factor <= 1:
            raise ConfigError(f"optim.warmup_factor must be in (0, 1], got {o.warmup_factor}")
        _nonneg("train.iters_per_epoch", t.iters_per_epoch)
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        _choice("train.amp_dtype", t.amp_dtype, AMP_DTYPES)
        _choice("eval.metric", e.metric, DISTANCES)
        _nonneg("eval.chunk_size", e.chunk_size)
        _prob("eval.rerank_lambda", e.rerank_lambda)
        _nonneg("eval.qe_alpha", e.qe_alpha)
        return self


# ---- dotted-key helpers ---------------------------------------------------

def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.k=5"`` -> ``("loss.k", 5)``; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A deep copy of ``tree`` with ``key=value`` strings applied."""
    out = copy.deepcopy(dict(tree))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(out, key, value)
    return out


def config_keys() -> set[str]:
    """Every dotted leaf key a config accepts (``{"loss.k", "data.synthetic.ids", ...}``)."""
    return set(flatten_mapping(Config().to_dict()))


def flatten(cfg: Config) -> dict[str, Any]:
    """The config as ``{dotted_key: value}``."""
    return flatten_mapping(cfg.to_dict())


def flatten_mapping(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested and dotted keys alike -> ``{dotted: value}`` (the one flat <-> nested conversion; its inverse
    is :func:`set_dotted` key by key)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_mapping(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key = "a.b.c"``, creating sections as needed."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}"
                          f" (known in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value, hint, name = data[f.name], hints[f.name], f"{prefix}{f.name}"
        if is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, f"{name}.")
        else:
            kwargs[f.name] = _coerce(name, value, hint)
    return cls(**kwargs)


def _coerce(name: str, value: Any, hint: type) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot or sign ("1e-3", "5e4") as strings.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


def _nonneg(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value!r}")


def _prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
