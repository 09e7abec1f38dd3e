"""Proposing trials: the study's Tune searcher and its Optuna record."""
