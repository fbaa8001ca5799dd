"""oneDNN linear with pre-packed weights for the engine on the CPU (fp32 and bf16).

PyTorch's default CPU linear (MKL) re-lays out the weight on every call; oneDNN with the weight packed once into its
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what `torch.compile`'s freezing pass emits for CPU linears)
was 1.6-2.5x faster at decode shapes (1 x 1024 -> 3072) and 1.75x at 64 rows in fp32 on this 2-core AMD Zen 4
(benchmarks/vllm_cpu.py's decoder), bf16 likewise. Same function: results differ from MKL's in the last bits only.

`pack_linears` swaps the `forward` of the decoder's and cross-attention's plain `nn.Linear` modules in place (their
parameters and state_dict are untouched; quantized or non-CPU weights are skipped); `unpack_linears` undoes it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) weight -> oneDNN's packed layout (an opaque tensor for `linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out) through the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _PackedForward:
    def __init__(self, module: nn.Linear):
        self.packed = pack(module.weight)
        self.bias = None if module.bias is None else module.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias)


def packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and type(w.detach()) is torch.Tensor  # not a quantized tensor subclass (torchao)
        and w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
    )


def pack_linears(model: nn.Module) -> int:
    """Pack every plain CPU linear of the decoder layers and cross-attention blocks (not the ViT: its batches are
    large, where MKL is as fast); returns how many. Idempotent."""
    n = 0
    with torch.no_grad():
        for part in (model.decoder.layers, model.xattn):
            for m in part.modules():
                if packable(m) and not isinstance(m.__dict__.get("forward"), _PackedForward):
                    m.forward = _PackedForward(m)
                    n += 1
    return n


def unpack_linears(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), _PackedForward):
            del m.forward
