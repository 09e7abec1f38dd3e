"""Metric losses over distance matrices, the distance itself, and the classification loss.

``build_loss(name, **params)`` builds one of ``triplet``, ``npair``, ``ranked_list``, ``he``
(``LossConfig.params()`` gives the keyword arguments of the configured one).
"""
from __future__ import annotations

import inspect

from .base import MetricLoss
from .cross_entropy import cross_entropy_ls
from .distance import euclidean_distance, pairwise_distance, prepare_features, prepared_distance
from .he import HardDistanceElasticLoss
from .npair import NPairLoss
from .ranked_list import RankedListLoss
from .triplet import TripletLoss

LOSSES: dict[str, type[MetricLoss]] = {
    "triplet": TripletLoss,
    "npair": NPairLoss,
    "ranked_list": RankedListLoss,
    "he": HardDistanceElasticLoss,
}


def build_loss(name: str, **params) -> MetricLoss:
    """The metric loss ``name`` with its keyword ``params``; unknown names or parameters raise ValueError."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    cls = LOSSES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"loss {name!r} has no parameter {unknown[0]!r} (it takes {', '.join(sorted(accepted))})")
    return cls(**params)


__all__ = [
    "LOSSES", "HardDistanceElasticLoss", "MetricLoss", "NPairLoss", "RankedListLoss", "TripletLoss",
    "build_loss", "cross_entropy_ls", "euclidean_distance", "pairwise_distance", "prepare_features",
    "prepared_distance",
]
