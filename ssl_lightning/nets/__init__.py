"""Backbones behind one interface, built by name: `build_backbone("wrn28_2", num_classes=10)`.

Importing this package registers every backbone; `available_backbones()` lists them.
"""

# The submodule imports register their backbones as a side effect; keep them here.
from ssl_lightning.nets import localization, resnet, small, vgg, vit, wrn  # noqa: F401
from ssl_lightning.nets.base import Backbone
from ssl_lightning.nets.heads import ProjectionHead
from ssl_lightning.nets.pretrained import PretrainedReport
from ssl_lightning.nets.registry import available_backbones, build_backbone, register_backbone

__all__ = [
    "Backbone",
    "PretrainedReport",
    "ProjectionHead",
    "available_backbones",
    "build_backbone",
    "register_backbone",
]
