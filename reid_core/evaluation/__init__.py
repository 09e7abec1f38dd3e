"""Re-ID evaluation: feature extraction, mAP / CMC / mINP, the per-query NumPy reference, k-reciprocal
re-ranking and average query expansion.

See docs/architecture.md (Evaluation contract) and docs/design.md (Evaluation protocol).
"""
from reid_core.evaluation.features import extract_features
from reid_core.evaluation.evaluate import evaluate_features
from reid_core.evaluation.rank import chunk_plan, evaluate_rank, query_gallery_distances
from reid_core.evaluation.query_expansion import average_query_expansion
from reid_core.evaluation.reference import evaluate_rank_reference
from reid_core.evaluation.rerank import re_ranking

__all__ = ["average_query_expansion", "chunk_plan", "evaluate_features", "evaluate_rank",
           "evaluate_rank_reference", "extract_features", "query_gallery_distances",
           "re_ranking"]
