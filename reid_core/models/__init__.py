"""Re-ID models: ResNet backbones (last stride, IBN-a, non-local), GeM pooling, BNNeck head.

See docs/architecture.md (Models contract): ``build_model(cfg, num_classes) -> ReIDModel``.
"""
from reid_core.models.backbone import ARCHS, LoadReport, ResNetBackbone, build_backbone, load_pretrained
from reid_core.models.layers import IBN, AvgPool, GeM, NonLocal
from reid_core.models.model import ReIDModel, ReIDOutput, build_model

__all__ = [
    "ARCHS", "AvgPool", "GeM", "IBN", "LoadReport", "NonLocal", "ReIDModel", "ReIDOutput", "ResNetBackbone",
    "build_backbone", "build_model", "load_pretrained",
]
