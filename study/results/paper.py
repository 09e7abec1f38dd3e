"""The paper's reference numbers, in one place.

Lee, Eum, Kwon, "Negative Samples are at Large: Leveraging Hard-distance Elastic Loss for
Re-identification", ECCV 2022. Only the supplementary material is in our hands
(the paper's supplementary material; docs/design.md, "The paper's tables"): every number below is
from it, on VeRi-776, mAP in percent, in the MoReID framework. The main paper's loss x framework and
per-dataset tables are *not* in our hands; :data:`PAPER.missing` says so, and the results tables show a
dash in those reference cells rather than a number. Nothing else in the code may hold a paper number.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class Ref:
    """One number reported by the paper (``value`` in percent) and where it is printed."""

    value: float
    source: str


@dataclass(frozen=True)
class Optimum:
    """Hyperparameters the paper reports as optimal (dotted config keys -> values), and where."""

    params: Mapping[str, Any]
    source: str


@dataclass(frozen=True)
class Paper:
    """Every reference number the results tables compare against."""

    dataset: str  # config name (``data.dataset``) of the data the numbers are on
    dataset_label: str  # how the tables name it
    metric: str  # the metric of every Ref below
    # Supplementary C: (framework.momentum, framework.include_past_positives) -> mAP; HE loss, MoReID.
    past_positives: Mapping[tuple[float, bool], Ref]
    # Supplementary D: (loss.name, loss.distance) -> mAP; distance None = not stated (any); MoReID.
    similarity: Mapping[tuple[str, str | None], Ref]
    # Supplementary E: (data.autoaug, model.ibn, model.non_local, loss.name) -> mAP; MoReID.
    backbone: Mapping[tuple[bool, bool, bool, str], Ref]
    npair_optimum: Optimum  # supplementary B: k found optimal in both frameworks
    ranked_list_optimum: Optimum  # supplementary B: alpha, beta found optimal in both frameworks
    missing: Mapping[str, str]  # table name -> why its reference cells are dashes


def _refs(source: str, values: Mapping[Any, float]) -> Mapping[Any, Ref]:
    return MappingProxyType({key: Ref(value, source) for key, value in values.items()})


PAPER = Paper(
    dataset="veri776",
    dataset_label="VeRi-776",
    metric="mAP",
    past_positives=_refs("supplementary C", {
        (0.995, True): 80.6, (0.997, True): 80.7, (0.999, True): 81.3,
        (0.995, False): 82.4, (0.997, False): 83.3, (0.999, False): 83.0,
    }),
    similarity=_refs("supplementary D", {
        ("triplet", None): 79.4, ("he", "cosine"): 82.9, ("he", "euclidean"): 83.3,
    }),
    backbone=_refs("supplementary E", {
        (False, False, False, "triplet"): 77.7, (False, False, False, "he"): 80.2,
        (False, True, True, "triplet"): 79.4, (False, True, True, "he"): 83.2,
        (True, False, True, "triplet"): 78.6, (True, False, True, "he"): 82.1,
        (True, True, False, "triplet"): 78.7, (True, True, False, "he"): 82.8,
        (True, True, True, "triplet"): 79.7, (True, True, True, "he"): 83.3,
    }),
    npair_optimum=Optimum(MappingProxyType({"loss.k": 15}), "supplementary B"),
    ranked_list_optimum=Optimum(MappingProxyType({"loss.alpha": 1.2, "loss.beta": 0.4}), "supplementary B"),
    missing=MappingProxyType({
        "loss_comparison": "the paper's loss x framework numbers are in its main text, which is not in our "
                           "hands: those reference cells are dashes",
        "datasets": "the paper's per-dataset numbers are in its main text, which is not in our hands: those "
                    "reference cells are dashes",
    }),
)
