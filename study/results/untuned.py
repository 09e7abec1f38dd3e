"""Losses compared with settings nobody tuned for our data, marked wherever they appear.

Ranked List's α and β are the paper's VeRi-776 optimum (α = 1.2, β = 0.4), found by the paper's search on
pretrained features. Our studies never choose them on a validation split of the training identities (the
``ranked_list`` study sweeps them and reads the test split, which is not a fair choice either), so every
row, cell, claim, legend entry and console line that holds Ranked List trials says so: an "HE beats Ranked
List" verdict is about an untuned Ranked List, not the paper's. The rule is by loss name alone, without a
config key: a loss listed here is marked, always. Remove it from :data:`UNTUNED` only together with a
search that picks its parameters on a validation split before the comparison runs.
"""
from __future__ import annotations

from typing import Any, Mapping

UNTUNED = {"ranked_list": "untuned α/β"}  # loss.name -> the mark its labels carry
NOTE = ("Ranked List (untuned α/β): α and β are the paper's VeRi-776 values, not chosen on a validation split "
        "of our training identities; a comparison with it is a comparison with an untuned Ranked List.")


def mark(loss: Any) -> str:
    """The mark for trials of ``loss`` (a ``loss.name``), or "" when the loss needs none."""
    return UNTUNED.get(loss, "") if isinstance(loss, str) else ""


def marked(label: str, loss: Any) -> str:
    """``label`` followed by `` (untuned α/β)`` when ``loss`` is marked."""
    found = mark(loss)
    return f"{label} ({found})" if found else label


def where_mark(where: Mapping[str, Any]) -> str:
    """The mark for a cell selected by conditions ``where`` (its ``loss.name`` condition, if any)."""
    return mark(where.get("loss.name"))
