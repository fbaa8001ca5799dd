"""InfiMM-HD in plain PyTorch: model, windows, processor, weights, engine. No Ray, no HTTP in this package."""

from .config import CrossAttnConfig, InfiMMHDConfig, TextConfig, VisionConfig
from .infimm import InfiMMHD
from .processor import ChatMessage, Inputs, Processor, PromptFormat
from .weights import CheckpointError, convert_checkpoint, load_pretrained, make_tiny_checkpoint
from .windows import ImageError, PageViews, WindowConfig, normalize_views, prepare_image, window_position_encoding

__all__ = [
    "ChatMessage",
    "CheckpointError",
    "CrossAttnConfig",
    "ImageError",
    "InfiMMHD",
    "InfiMMHDConfig",
    "Inputs",
    "PageViews",
    "Processor",
    "PromptFormat",
    "TextConfig",
    "VisionConfig",
    "WindowConfig",
    "convert_checkpoint",
    "load_pretrained",
    "make_tiny_checkpoint",
    "normalize_views",
    "prepare_image",
    "window_position_encoding",
]
