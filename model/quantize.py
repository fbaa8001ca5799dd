"""Quantized weights through torchao's `quantize_` (its tensor subclasses and kernels; nothing hand-written here).

Modes (`--quantize`), and what each does to which linear layer:

| mode | ViT blocks (qkv, proj, fc1, fc2) | decoder layers and cross-attention blocks | runs on |
|---|---|---|---|
| none | bf16 / fp32 | bf16 / fp32 | anywhere |
| int8 | int8 weight-only, per row | int8 weight-only, per row | CPU, CUDA |
| int4 | int8 weight-only, per row | int4 weight-only, groups of 128 (tinygemm layout) | CUDA, cc >= 8.0, bf16 |
| fp8 | fp8 e4m3 weights and dynamic per-row activations | the same | CUDA, cc >= 8.9, bf16 |

Kept in high precision, in every mode:
* norms (LayerNorm, RMSNorm), biases, the ViT's cls/pos embeddings and patch convolution (a 3-channel conv: 0.01 %
  of the weights, and the first layer sees raw pixels);
* the token embeddings (a lookup, not a matmul) and the LM head (the logits greedy decoding compares; 0.3 GB of
  18 GB; the engine pads it for its output GEMM);
* the cross-attention gates (element-wise tanh scales of whole branches);
* the ViT's `head` (unused on the feature path, loaded only so checkpoints load strictly).
The ViT stays int8 in int4 mode: it is compute-bound (weight-only int4 saves bytes, not FLOPs) and its features feed
every cross-attention block. Linear layers whose widths the kernel cannot take (int4: in_features not a multiple of
32; fp8: a width not a multiple of 16) stay in high precision (only tiny test configs have such widths).

Checkpoints stay in the official layout: `weights.load_pretrained(..., quantize=mode)` loads strictly, then quantizes
each ViT block, decoder layer and cross-attention block as soon as its tensors are on the device, so the full
unquantized model never sits there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4", "fp8")
INT4_GROUP = 128  # torchao's default group for int4 weight-only; tinygemm takes 32, 64, 128, 256
INT4_MIN_CC = (8, 0)  # tinygemm's tensor-core kernel
FP8_MIN_CC = (8, 9)  # fp8 tensor cores: Ada (L4, L40S, RTX 4090) and Hopper (H100, H200)

# Which linear layers are quantized, by parameter path. Everything else stays in high precision (module docstring).
VISION_LINEARS = re.compile(r"^vision\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$")
TEXT_LINEARS = re.compile(r"^decoder\.layers\.\d+\.(attn\.wqkv|attn\.wo|mlp\.w_gate_up|mlp\.w_down)$")
XATTN_LINEARS = re.compile(r"^xattn\.\d+\.(attn\.to_q|attn\.to_kv|attn\.to_out|ff\.1|ff\.3)$")
# Units quantized one at a time while loading: a ViT block, a decoder layer, a cross-attention block.
UNIT = r"(vision\.blocks\.\d+|decoder\.layers\.\d+|xattn\.\d+)"


def part_of(name: str) -> str | None:
    """Module path -> "vision" | "text" (decoder and cross-attention) | None (kept in high precision)."""
    if VISION_LINEARS.match(name):
        return "vision"
    if TEXT_LINEARS.match(name) or XATTN_LINEARS.match(name):
        return "text"
    return None


def validate_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def torchao():
    """Import torchao quietly: on a CPU-only torch it logs a warning for each CUDA extension it cannot load."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization as q
    except ImportError as e:
        raise ValueError("quantized weights need torchao: pip install 'torchao>=0.18'") from e
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return q


def check_supported(mode: str, device: str | torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError, saying what to use instead, when this device cannot run `mode`."""
    validate_mode(mode)
    if mode == "none":
        return
    torchao()
    device = torch.device(device)
    if mode == "int8":
        return
    if device.type != "cuda":
        what = "torchao has no CPU kernel for int4 weight-only" if mode == "int4" else "fp8 needs a CUDA GPU"
        raise ValueError(f"--quantize {mode} cannot run on {device.type}: {what}; use --quantize int8 (or none)")
    cc = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    need = INT4_MIN_CC if mode == "int4" else FP8_MIN_CC
    if cc < need:
        cards = "A10G, A100, L4, RTX 3090/4090, H100" if mode == "int4" else "L4, L40S, RTX 4090, H100, H200"
        instead = "int8" if mode == "int4" else "int8 or int4" if cc >= INT4_MIN_CC else "int8"
        raise ValueError(
            f"--quantize {mode} needs compute capability >= {need[0]}.{need[1]} ({cards}); this {name} is "
            f"{cc[0]}.{cc[1]}: use --quantize {instead}"
        )
    if dtype != torch.bfloat16:
        got = str(dtype).removeprefix("torch.")
        raise ValueError(f"--quantize {mode} runs in bfloat16 on the GPU; got --dtype {got}")


def configs(mode: str) -> dict[str, object]:
    """torchao config per part ("vision", "text") for `mode`; a callable instead picks the config per layer."""
    q = torchao()
    if mode == "int8":
        return {"vision": q.Int8WeightOnlyConfig(), "text": q.Int8WeightOnlyConfig()}
    if mode == "int4":
        return {"vision": q.Int8WeightOnlyConfig(), "text": _int4_config}
    if mode == "fp8":
        fp8 = q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow())
        return {"vision": fp8, "text": fp8}
    raise ValueError(f"no torchao config for quantize={mode!r}")


def int4_group(in_features: int) -> int | None:
    """The group size of an int4 layer: 128, or the largest smaller one the kernel takes that divides the width."""
    return next((g for g in (INT4_GROUP, 64, 32) if in_features % g == 0), None)


def _int4_config(linear: nn.Linear):
    group = int4_group(linear.in_features)
    if group is None:
        return None
    q = torchao()
    return q.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")


def _kernel_takes(mode: str, linear: nn.Linear) -> bool:
    if mode == "fp8":
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0
    if mode == "int4":
        return linear.out_features % 8 == 0  # tinygemm tiles of 8 output rows
    return True


def quantize_module(module: nn.Module, mode: str, prefix: str = "", parts: dict[str, object] | None = None) -> int:
    """Quantize the target linear layers inside `module` (whose path in the model is `prefix`) in place.

    `parts` overrides `configs(mode)` (benchmarks use it to emulate a mode). Returns how many layers were quantized.
    """
    if mode == "none":
        return 0
    parts = configs(mode) if parts is None else parts
    q = torchao()
    done = 0
    for name, child in list(module.named_modules()):
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        part = part_of(full)
        if part is None or not isinstance(child, nn.Linear) or is_quantized(child) or not _kernel_takes(mode, child):
            continue
        cfg = parts[part]
        cfg = cfg(child) if isinstance(cfg, Callable) else cfg
        if cfg is None:
            continue
        q.quantize_(child, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        done += int(is_quantized(child))
    return done


def quantize_model(model: nn.Module, mode: str, parts: dict[str, object] | None = None) -> int:
    """Quantize an already loaded model in place (unit by unit, so the peak is one unit above the result).

    "none", or the mode the model already has, leaves it as it is.
    """
    validate_mode(mode)
    current = getattr(model, "quantization", "none")
    if mode in ("none", current):
        return 0
    if current != "none":
        raise ValueError(f"the model is already quantized to {current}; load the checkpoint again for {mode}")
    p = next(model.parameters())
    if parts is None:
        check_supported(mode, p.device, p.dtype)
    done = sum(quantize_module(m, mode, name, parts) for name, m in units(model))
    model.quantization = mode
    log.info("quantized %d linear layers to %s (%.2f GB of weights)", done, mode, model_bytes(model) / 1e9)
    return done


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules quantized one at a time: every ViT block, decoder layer and cross-attention block."""
    return [(name, m) for name, m in model.named_modules() if re.fullmatch(UNIT, name)]


def unit_of(param: str) -> str:
    """Parameter path -> its unit's path ("" for parameters outside every unit: embeddings, final norm, LM head)."""
    m = re.match(UNIT + r"\.", param)
    return m.group(1) if m else ""


def load_by_unit(
    model: nn.Module, names: list[str], read: Callable[[str], torch.Tensor], mode: str, strict: bool = True
) -> int:
    """Materialise a meta-device model from `read(name)` one unit at a time, quantizing each unit once it is loaded.

    Peak device memory: the quantized units so far plus one unquantized unit. Returns the quantized layer count.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(unit_of(name), []).append(name)
    done = 0
    for prefix, members in groups.items():
        if not prefix:
            continue
        unit = model.get_submodule(prefix)
        state = {n[len(prefix) + 1 :]: read(n) for n in members}
        unit.load_state_dict(state, strict=strict, assign=True)
        del state
        done += quantize_module(unit, mode, prefix)
    rest = {n: read(n) for n in groups.get("", [])}
    model.load_state_dict(rest, strict=False, assign=True)
    if strict:
        left = [n for n, p in model.named_parameters() if p.is_meta]
        assert not left, f"parameters never loaded: {left[:5]}"
    model.quantization = mode
    return done


def is_quantized(linear: nn.Module) -> bool:
    w = getattr(linear, "weight", None)
    return w is not None and type(w.data) is not torch.Tensor


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, counting the inner tensors of torchao's subclasses (packed data, scales, zero points)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Device bytes of the model's parameters and persistent buffers (the RoPE table included)."""
    params = sum(tensor_bytes(p.data) for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for b in model.buffers())
