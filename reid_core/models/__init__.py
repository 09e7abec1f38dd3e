"""Re-ID models: ResNet backbones (last stride, IBN-a, non-local), GeM pooling, BNNeck head.

See docs/architecture.md (Models contract): ``build_model(cfg, num_classes) -> ReIDModel``.
"""
from reid_core.models.backbone import ARCHS, NON_LOCAL_BLOCKS, ResNetBackbone, build_backbone
from reid_core.models.layers import IBN, AvgPool, DotProductNonLocal, GeM, NonLocal
from reid_core.models.model import ReIDModel, ReIDOutput, build_model, check_pretrained, compile_backbones
from reid_core.models.pretrained import (OFFICIAL_WEIGHTS, PretrainedError, PretrainedReport, WeightsSource,
                                         fetch_weights, load_pretrained, resolve_pretrained)

__all__ = [
    "ARCHS", "AvgPool", "DotProductNonLocal", "GeM", "IBN", "NON_LOCAL_BLOCKS", "NonLocal", "OFFICIAL_WEIGHTS",
    "PretrainedError", "PretrainedReport", "ReIDModel", "ReIDOutput", "ResNetBackbone", "WeightsSource",
    "build_backbone", "build_model", "check_pretrained", "compile_backbones", "fetch_weights", "load_pretrained",
    "resolve_pretrained",
]
