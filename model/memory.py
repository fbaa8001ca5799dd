"""How many decode slots and how large a ViT batch fit a card: the engine's memory plan.

Legend: L decoder layers, X cross-attention layers, Hkv/Dh key/value heads and head width, Hx/dx cross-attention
heads and head width, N tokens per view, W/Hm ViT width and MLP width, Dv visual width, D/I decoder width and MLP
width, V views per page (thumbnail + windows), M = V*N media tokens, T = max_seq_len, e bytes per element.

What sits on the card (bytes):
* weights: measured on the loaded model (`quantize.model_bytes`), or computed per mode from the config here;
* reserve: CUDA context, cuBLAS workspaces, CUDA-graph pools and allocator slack (`RESERVE`, an estimate: the first
  GPU run compares the plan with the measured peak, benchmarks/gpu.py);
* the feature cache (`feature_cache_mb`, counted full);
* per slot, for as long as the slot exists: the KV cache 2*L*Hkv*Dh*T*e and the last image's cross-attention K/V
  2*X*Hx*dx*M'*e (M' = M rounded up to `media_align`), both preallocated by the engine;
* per ViT view in a batch: N*(3W + 2Hm)*e (the residual stream, a branch output and its sum, fc1's output and GELU's;
  the chunk's features wait for their page);
* per request in a prefill batch: M*(2Dv + 2*X*Hx*dx)*e (its page's features, the media padded into one tensor and
  the K/V of every cross-attention layer, projected at once) + T*(6D + 3I)*e + T*T (prompt activations, mask);
* once: building a page's media (M*Dv in float32 twice and once in e) and the views encoded ahead of admission.

The ViT batch and the prefill batch never run at the same time, so the larger of the two counts. Sizing: whatever is
left after the weights, the reserve, the cache and the per-page terms is `free`; the ViT and prefill batches may take
up to `TRANSIENT_SHARE` of it (each at least 1, at most what the config asks); the rest is divided into slots (at
most `max_slots`). A setting where not even one slot fits is refused with these numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import torch

from .config import InfiMMHDConfig

log = logging.getLogger(__name__)

GiB = 2**30
RESERVE = int(1.5 * GiB)
TRANSIENT_SHARE = 0.25


def parse_size(text: str | int | float) -> int:
    """'24GiB', '24 GB', '80g', '512MiB', or a number of bytes -> bytes. GB = 1e9, GiB (and a bare G) = 2**30."""
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 24GiB, 48GB or 81559MiB")
    value, unit = float(m.group(1)), (m.group(2) or "b")
    if unit == "b":
        return int(value)
    power = "kmgt".index(unit[0]) + 1
    base = 1000 if unit.endswith("b") and "i" not in unit else 1024
    return int(value * base**power)


def gb(n: int | float) -> str:
    return f"{n / 1e9:.2f} GB"


# ---- weights per mode, from the config --------------------------------------------------------------------------
def linear_bytes(out_f: int, in_f: int, kind: str, e: int) -> int:
    """Bytes of one linear weight as torchao stores it: int8 per row (data + scale + zero point); int4 in groups
    (two values a byte, a scale and a zero point per group, both bf16); fp8 per row (data + float32 scale)."""
    from .quantize import int4_group

    if kind == "int8":
        return out_f * in_f + out_f * (e + 1)
    if kind == "int4" and int4_group(in_f) and out_f % 8 == 0:
        return out_f * in_f // 2 + (in_f // int4_group(in_f)) * out_f * 2 * 2
    if kind == "fp8" and in_f % 16 == 0 and out_f % 16 == 0:
        return out_f * in_f + out_f * 4
    return out_f * in_f * e  # kept in high precision (or a width the kernel cannot take)


def linear_shapes(cfg: InfiMMHDConfig) -> dict[str, list[tuple[int, int]]]:
    """(out, in) of every quantizable linear layer, by part (see quantize.py)."""
    v, t, x = cfg.vision, cfg.text, cfg.xattn
    W, Hm = v.width, v.mlp_hidden
    D, I, Dh = t.hidden, t.intermediate, t.head_dim
    vision = [(3 * W, W), (W, W), (Hm, W), (W, Hm)] * v.layers
    text = [((t.heads + 2 * t.kv_heads) * Dh, D), (D, t.heads * Dh), (2 * I, D), (D, I)] * t.layers
    xattn = [(x.inner, D), (2 * x.inner, cfg.vis_dim), (D, x.inner), (D * x.ff_mult, D), (D, D * x.ff_mult)]
    return {"vision": vision, "text": text + xattn * len(cfg.xattn_layers)}


def weight_bytes(cfg: InfiMMHDConfig, quantize: str = "none", e: int = 2) -> int:
    """Bytes of the model's weights after `quantize` (parameters, plus the float32 RoPE table)."""
    from .infimm import InfiMMHD

    with torch.device("meta"):
        total = sum(p.numel() for p in InfiMMHD(cfg).parameters()) * e
    kinds = {"none": ("none", "none"), "int8": ("int8", "int8"), "int4": ("int8", "int4"), "fp8": ("fp8", "fp8")}
    for part, kind in zip(("vision", "text"), kinds[quantize], strict=True):
        for out_f, in_f in linear_shapes(cfg)[part]:
            total += linear_bytes(out_f, in_f, kind, e) - out_f * in_f * e
    return total + cfg.text.max_positions * cfg.text.head_dim * 4


def largest_linear(cfg: InfiMMHDConfig) -> int:
    return max(o * i for shapes in linear_shapes(cfg).values() for o, i in shapes)


# ---- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    gpu_memory: int
    utilization: float
    quantize: str
    max_seq_len: int
    max_views: int
    weights: int
    reserve: int
    feature_cache: int
    dequant_scratch: int  # weight-only modes dequantize one layer at a time
    page_build: int
    staged: int
    vit_view: int
    prefill_request: int
    slot_kv: int
    slot_media: int
    vit_batch: int = 0
    prefill_batch: int = 0
    max_slots: int = 0
    reason: str = ""  # why it does not fit ("" when it does)

    @property
    def budget(self) -> int:
        return int(self.gpu_memory * self.utilization)

    @property
    def per_slot(self) -> int:
        return self.slot_kv + self.slot_media

    @property
    def fixed(self) -> int:
        return self.weights + self.reserve + self.feature_cache + self.dequant_scratch + self.page_build + self.staged

    @property
    def transient(self) -> int:
        return max(self.vit_batch * self.vit_view, self.prefill_batch * self.prefill_request)

    @property
    def need(self) -> int:
        return self.fixed + self.transient + self.max_slots * self.per_slot

    @property
    def fits(self) -> bool:
        return not self.reason

    def line(self) -> str:
        share = f"{gb(self.budget)} of {gb(self.gpu_memory)} ({self.utilization:.2f})"
        head = f"memory plan: {share}, quantize {self.quantize}"
        if not self.fits:
            return f"{head}: does not fit: {self.reason}"
        return (
            f"{head}: weights {gb(self.weights)} + reserve {gb(self.reserve)} + feature cache "
            f"{gb(self.feature_cache)} + ViT batch {self.vit_batch} views / prefill batch {self.prefill_batch} "
            f"{gb(self.transient)} + {self.max_slots} slot{'s' * (self.max_slots != 1)} x {gb(self.per_slot)} (KV "
            f"{gb(self.slot_kv)} at "
            f"{self.max_seq_len} tokens, cross-attention K/V {gb(self.slot_media)} at {self.max_views} views) "
            f"= {gb(self.need)}"
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(budget=self.budget, per_slot=self.per_slot, transient=self.transient, need=self.need)
        out["fits"] = self.fits
        return out


def plan_memory(
    cfg: InfiMMHDConfig,
    gpu_memory: int,
    utilization: float = 0.9,
    *,
    quantize: str = "none",
    e: int = 2,
    weights: int | None = None,
    max_seq_len: int = 1024,
    max_views: int = 17,
    max_slots: int = 256,
    vit_batch_views: int = 32,
    max_prefill_batch: int = 16,
    vit_step_views: int = 64,
    feature_cache_mb: int = 1024,
    media_align: int = 128,
    reserve: int = RESERVE,
    sized: bool = True,
) -> MemoryPlan:
    """The plan for a card of `gpu_memory` bytes used up to `utilization`.

    sized: derive the slots and the ViT/prefill batches (the config's values are upper bounds); otherwise take them
    as given and only report whether they fit. `weights` overrides the computed weight bytes (a loaded model's).
    """
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu memory utilization must be in (0, 1], got {utilization}")
    t, v, x = cfg.text, cfg.vision, cfg.xattn
    N, W, Dv = v.tokens, v.width, cfg.vis_dim
    M = max_views * N
    align = max(1, media_align)
    X = len(cfg.xattn_layers)
    plan = MemoryPlan(
        gpu_memory=gpu_memory,
        utilization=utilization,
        quantize=quantize,
        max_seq_len=max_seq_len,
        max_views=max_views,
        weights=weight_bytes(cfg, quantize, e) if weights is None else weights,
        reserve=reserve,
        feature_cache=feature_cache_mb * 2**20,
        dequant_scratch=largest_linear(cfg) * e if quantize in ("int8", "int4") else 0,
        page_build=M * Dv * (4 + 4 + e),
        staged=max(vit_step_views, max_views) * N * Dv * e,
        vit_view=N * (3 * W + 2 * v.mlp_hidden) * e,
        prefill_request=M * (2 * Dv + 2 * X * x.inner) * e
        + max_seq_len * (6 * t.hidden + 3 * t.intermediate) * e
        + max_seq_len**2,
        slot_kv=2 * t.layers * t.kv_heads * t.head_dim * max_seq_len * e,
        slot_media=2 * X * x.inner * (-(-M // align) * align) * e,
    )
    if not sized:
        plan = dataclasses.replace(
            plan, vit_batch=vit_batch_views, prefill_batch=min(max_prefill_batch, max_slots), max_slots=max_slots
        )
        if plan.need > plan.budget:
            plan = dataclasses.replace(plan, reason=f"needs {gb(plan.need)}, over {gb(plan.budget)}")
        return plan
    free = plan.budget - plan.fixed
    if free <= 0:
        return dataclasses.replace(
            plan,
            reason=f"weights {gb(plan.weights)} + reserve {gb(plan.reserve)} + feature cache {gb(plan.feature_cache)}"
            f" + per-page buffers {gb(plan.fixed - plan.weights - plan.reserve - plan.feature_cache)} = "
            f"{gb(plan.fixed)} leave nothing of {gb(plan.budget)}; use a smaller --quantize mode, a larger card, "
            "a higher --gpu-memory-utilization or a smaller feature cache",
        )
    cap = free * TRANSIENT_SHARE
    vit = max(1, min(vit_batch_views, int(cap // plan.vit_view)))
    prefill = max(1, min(max_prefill_batch, int(cap // plan.prefill_request)))
    transient = max(vit * plan.vit_view, prefill * plan.prefill_request)
    slots = min(max_slots, int((free - transient) // plan.per_slot))
    if slots < 1:
        return dataclasses.replace(
            plan,
            vit_batch=vit,
            prefill_batch=prefill,
            reason=f"one slot needs {gb(plan.per_slot)} (KV {gb(plan.slot_kv)} at {max_seq_len} tokens + "
            f"cross-attention K/V {gb(plan.slot_media)} at {max_views} views) and one prefill "
            f"{gb(transient)}, but weights and buffers ({gb(plan.fixed)}) leave {gb(free)} of {gb(plan.budget)}; "
            "lower --max-seq-len or --max-windows, or use a smaller --quantize mode",
        )
    return dataclasses.replace(plan, vit_batch=vit, prefill_batch=min(prefill, slots), max_slots=slots)


def plan_for_engine(cfg: InfiMMHDConfig, config, gpu_memory: int, weights: int | None, quantize: str, e: int):
    """The plan of an `EngineConfig` (sized when it sets gpu_memory_utilization, else checked as given)."""
    sized = config.gpu_memory_utilization is not None
    return plan_memory(
        cfg,
        gpu_memory,
        config.gpu_memory_utilization if sized else 1.0,
        quantize=quantize,
        e=e,
        weights=weights,
        max_seq_len=config.max_seq_len,
        max_views=config.max_views,
        max_slots=config.max_slots,
        vit_batch_views=config.vit_batch_views,
        max_prefill_batch=config.max_prefill_batch,
        vit_step_views=config.vit_step_views,
        feature_cache_mb=config.feature_cache_mb,
        media_align=config.media_align,
        sized=sized,
    )


def size_engine(model, config, device):
    """EngineConfig -> (EngineConfig, plan or None) for the engine's constructor.

    With `gpu_memory_utilization` the slots, ViT batch and prefill batch come from the plan (the config's values are
    upper bounds), and a setting where nothing fits is refused. Without it, on a CUDA device, the configured values
    are checked against the card and a warning names the numbers if the estimate is over it.
    """
    from .quantize import model_bytes

    sized = config.gpu_memory_utilization is not None
    total = config.gpu_memory_bytes
    if total is None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    if total is None:
        if sized:
            raise ValueError("gpu_memory_utilization sizes the engine to a CUDA card; on the CPU give gpu_memory_bytes")
        return config, None
    p = model.decoder.embed_tokens.weight
    plan = plan_for_engine(
        model.config, config, total, model_bytes(model), getattr(model, "quantization", "none"), p.element_size()
    )
    if not sized:
        if not plan.fits:
            log.warning("the engine's settings may not fit this device: %s", plan.line())
        return config, plan
    if not plan.fits:
        raise ValueError(plan.line())
    log.info(plan.line())
    sized_config = dataclasses.replace(
        config, max_slots=plan.max_slots, vit_batch_views=plan.vit_batch, max_prefill_batch=plan.prefill_batch
    )
    return sized_config, plan


def fit_table(cfg: InfiMMHDConfig, cards_gib=(24, 48, 80), modes=("none", "int8", "int4", "fp8"), **kw) -> list[dict]:
    """What fits per card and mode at the engine's default lengths: rows for docs/performance.md and the CLI."""
    rows = []
    for mode in modes:
        for card in cards_gib:
            plan = plan_memory(cfg, card * GiB, quantize=mode, **kw)
            rows.append({"card_gib": card, "quantize": mode, **plan.to_dict()})
    return rows
