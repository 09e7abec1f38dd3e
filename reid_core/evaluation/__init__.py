"""Re-ID evaluation: feature extraction, mAP / CMC / mINP, and the per-query NumPy reference.

See docs/architecture.md (Evaluation contract) and DESIGN.md section 6 (protocol).
"""
from reid_core.evaluation.features import extract_features
from reid_core.evaluation.rank import METRICS, chunk_plan, evaluate_features, evaluate_rank, pairwise_distances
from reid_core.evaluation.reference import evaluate_rank_reference

__all__ = ["METRICS", "chunk_plan", "evaluate_features", "evaluate_rank", "evaluate_rank_reference",
           "extract_features", "pairwise_distances"]
