"""Vision layer: image loading/processing, vision towers, the LLaVA projector and the VQ image tokenizer.

This package imports nothing from the rest of mmdlm (it is a lower layer); open_clip, timm and transformers
are imported only when a tower that needs them is built.
"""

from .image_processing import (
    ImageLoadError,
    MMDLMImageProcessor,
    anyres_grid_shape,
    expand_to_square,
    load_image,
    parse_grid_pinpoints,
    process_anyres_image,
    resize_keep_aspect,
    select_best_resolution,
)
from .image_tokenizer import VQConfig, VQImageTokenizer
from .projector import build_projector
from .tower_config import SIGLIP_SO400M_384
from .towers import VisionTower, create_vision_tower

__all__ = [
    "ImageLoadError",
    "MMDLMImageProcessor",
    "SIGLIP_SO400M_384",
    "VQConfig",
    "VQImageTokenizer",
    "VisionTower",
    "anyres_grid_shape",
    "build_projector",
    "create_vision_tower",
    "expand_to_square",
    "load_image",
    "parse_grid_pinpoints",
    "process_anyres_image",
    "resize_keep_aspect",
    "select_best_resolution",
]
