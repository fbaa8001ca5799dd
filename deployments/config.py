"""Settings of the online service: the builder's `args` (from `infra/serve.yaml` or `infimm-hd serve`) and the limits.

`ServeArgs` is plain data handed to both deployments; each takes what it needs. Unknown keys are refused so a typo in
the YAML fails the deploy instead of being ignored. Plain data only: `deployments.app.application_from_config` turns a
Serve config file (the same one `serve run` / `serve deploy` read) into an Application, so the CLI and the tests deploy
exactly that file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The import path that infra/serve.yaml points at; `app.application_from_config` only builds this app.
IMPORT_PATH = "deployments.app:build_app"
MODEL_DEPLOYMENT = "InfimmModel"
INGRESS_DEPLOYMENT = "OpenAIIngress"


# S3 bucket naming rules (https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html): 3-63 of
# lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit, no "..", not an IP address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")


def valid_bucket(name: str) -> bool:
    return bool(_BUCKET.fullmatch(name)) and ".." not in name and not _IPV4.fullmatch(name)


def split_s3_prefix(entry: str) -> tuple[str, str]:
    """`bucket`, `bucket/prefix` or `s3://bucket/prefix` -> (bucket, key prefix); ValueError for a bad bucket name."""
    bucket, _, prefix = entry.removeprefix("s3://").partition("/")
    if not valid_bucket(bucket):
        raise ValueError(f"allowed_s3_prefixes entry {entry!r}: {bucket!r} is not a valid S3 bucket name")
    return bucket, prefix


class Limits(BaseModel):
    """What one request may ask for. Each is answered with a clear 4xx naming the limit (docs/service.md, limits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_bytes: int = Field(20 * 2**20, ge=1024, description="HTTP body size (base64 images count here)")
    max_image_bytes: int = Field(10 * 2**20, ge=1, description="one image after base64 decoding or download")
    max_images: int = Field(4, ge=0, description="images per request")
    max_megapixels: float = Field(
        40.0, gt=0, description="declared width x height, read from the header before decoding"
    )
    max_windows: int = Field(34, ge=1, description="448x448 views per request over all images (windows + thumbnails)")
    max_prompt_tokens: int = Field(4096, ge=1, description="tokens of the rendered prompt, image placeholders included")
    max_chars_per_token: int = Field(
        32,
        ge=1,
        description="the ingress refuses text over max_prompt_tokens x this many characters without tokenizing it "
        "(no token of the served tokenizers covers more; the model replica checks the exact bound of its vocabulary)",
    )
    max_tokens: int = Field(1024, ge=1, description="largest max_tokens a client may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when the request names none")
    max_stop: int = Field(4, ge=0, description="stop strings per request (OpenAI allows 4)")
    max_buffered_bytes: int = Field(
        512 * 2**20,
        ge=1024,
        description="request bodies one ingress replica holds at once; past it new bodies get a 503 (so a high "
        "max_ongoing_requests, which slow clients need, cannot add up to max_request_bytes each)",
    )

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)


class ServeArgs(BaseModel):
    """Arguments of `build_app` (the `args:` block of infra/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")

    # model replica
    checkpoint: str | None = Field(None, description="checkpoint folder; None = the demo reader (demo only)")
    random_weights: bool = Field(
        False, description="with no checkpoint: tiny RANDOM weights instead of the demo reader"
    )
    model_name: str = Field("infimm-hd", description="the `model` id clients send and /v1/models lists")
    device: str | None = Field(None, description="cpu, cuda, cuda:1; default: cuda if the replica sees a GPU")
    dtype: str | None = Field(None, description="float32 | bfloat16; default: bfloat16 on GPU, float32 on CPU")
    prompt_format: str = "vicuna"
    max_slots: int = Field(
        8,
        ge=1,
        description="engine decode slots per replica (continuous batching width; an upper bound when "
        "gpu_memory_utilization sizes the engine)",
    )
    quantize: Literal["none", "int8", "int4", "fp8"] = Field("none", description="weights (model/quantize.py)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="size slots and the ViT batch to this fraction of the replica's GPU"
    )
    max_seq_len: int = Field(1024, ge=16, description="prompt + new tokens per request")
    max_windows_per_image: int = Field(16, ge=1, description="WindowConfig.max_windows; the batch pipeline's default")
    max_waiting: int | None = Field(None, ge=0, description="engine queue depth at which a replica answers 503")
    feature_cache_mb: int = Field(
        1024, ge=0, description="encoded pages a replica keeps for repeated images (LRU); its RSS grows to it"
    )
    # ingress
    limits: Limits = Field(default_factory=Limits)
    api_key: str | None = Field(None, description="bearer token clients must send; None = read api_key_env")
    api_key_env: str = Field("INFIMM_API_KEY", description="environment variable holding the key (unset = no auth)")
    allowed_http_hosts: list[str] = Field(default_factory=list, description="hosts http(s) image URLs may name")
    allowed_s3_prefixes: list[str] = Field(
        default_factory=list,
        description="`bucket` or `bucket/prefix` entries s3:// image URLs must fall under; empty = s3:// refused",
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for s3:// images; default: boto3's chain")
    fetch_timeout_s: float = Field(10.0, gt=0, description="per image download")
    request_timeout_s: float = Field(300.0, gt=0, description="whole request, first byte to last token")
    body_timeout_s: float = Field(
        10.0, gt=0, description="the whole request body must arrive within this; slower clients get a 408"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After of our 503 answers")
    metrics: bool = Field(True, description="export ray_infimm_* from the replicas")

    @field_validator("allowed_s3_prefixes")
    @classmethod
    def _check_s3_prefixes(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            split_s3_prefix(entry)
        return entries

    def window_config(self):
        from model.windows import WindowConfig

        return WindowConfig(max_windows=self.max_windows_per_image, max_pixels=self.limits.max_pixels)


# ---- Serve config files ----------------------------------------------------------------------------------------------
def load_serve_config(path: str | Path) -> dict:
    """Read and validate a Serve config file with Serve's own schema (what `serve deploy` checks)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(Path(path).read_text())
    ServeDeploySchema.model_validate(config)
    return config
