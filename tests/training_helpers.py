"""What the training tests share (their `tokenizer_dir` fixture is in conftest)."""

from __future__ import annotations

from model.config import InfiMMHDConfig, VisionConfig


def small_config(image_size: int = 56) -> InfiMMHDConfig:
    tiny = InfiMMHDConfig.preset("tiny")
    return tiny.replace(vision=VisionConfig(**{**tiny.vision.__dict__, "image_size": image_size}))
