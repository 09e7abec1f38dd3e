"""Training frameworks: Baseline and MoReID (momentum key encoder f_k + FIFO dictionary of keys)."""
from .dictionary import KeyDictionary
from .framework import (FINITE_TERMS, FRAMEWORKS, STAT_NAMES, Baseline, Framework, MoReID, StepOutput,
                        build_framework)
from .momentum import make_key_encoder, momentum_update

__all__ = [
    "FINITE_TERMS", "FRAMEWORKS", "STAT_NAMES", "Baseline", "Framework", "KeyDictionary", "MoReID", "StepOutput",
    "build_framework", "make_key_encoder", "momentum_update",
]
