"""Configuration of InfiMM-HD: one frozen dataclass per component, official numbers as defaults.

The official checkpoint ships a `config.json` in the HF schema (spec §2): `visual` and `language` dicts plus a few
top-level keys. `InfiMMHDConfig.from_hf_config` / `to_hf_config` read and write that schema so a downloaded
checkpoint just works.
Values the official config does not carry (cross-attention heads, ff_mult) come from the official block defaults
(spec §4.3).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class VisionConfig:
    """EVA-CLIP ViT ("eva-clip-4b-14-x"): post-norm blocks, q/v biases, exact GELU (spec §3.1)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1792
    layers: int = 64
    head_width: int = 112
    mlp_ratio: float = 8.571428571428571
    embed_dim: int = 1024  # size of the (unused) CLIP head; kept so the official keys load strictly
    ln_eps: float = 1e-6

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)  # official: int(1792 * 8.571428571428571) = 15360

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid * self.grid + 1  # patches + CLS = 1025 at 448 px


@dataclass(frozen=True)
class TextConfig:
    """Llama decoder, Vicuna-13B-v1.5 shape with the vocabulary resized to 32002 (spec §4.1)."""

    vocab_size: int = 32002
    hidden: int = 5120
    layers: int = 40
    heads: int = 40
    kv_heads: int = 40
    intermediate: int = 13824
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class CrossAttnConfig:
    """Gated cross-attention blocks (official `GatedCrossAttentionBlock` defaults, spec §4.3)."""

    every_n_layers: int = 4
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 1
    ln_eps: float = 1e-5

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head

    def layer_indices(self, n_layers: int) -> tuple[int, ...]:
        """Decoder layers that get a block *before* them: (i + 1) % n == 0, i.e. (3, 7, ..., 39) for 40 layers."""
        return tuple(i for i in range(n_layers) if (i + 1) % self.every_n_layers == 0)


@dataclass(frozen=True)
class InfiMMHDConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    xattn: CrossAttnConfig = field(default_factory=CrossAttnConfig)
    image_token_id: int = 32001
    eoc_token_id: int = 32000
    # Length of the sinusoid table of the 2-D window encoding; values do not depend on it (spec §3.4), it only
    # bounds the grid.
    pe_max_pos: int = 64

    @property
    def xattn_layers(self) -> tuple[int, ...]:
        return self.xattn.layer_indices(self.text.layers)

    @property
    def vis_dim(self) -> int:
        return self.vision.width

    # ---- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> InfiMMHDConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    # ---- official config.json round trip ---------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict) -> InfiMMHDConfig:
        missing = [k for k in ("visual", "language", "image_token_id", "eoc_token_id") if k not in cfg]
        if missing:
            raise ValueError(f"not an InfiMM-HD config.json: missing {missing}")
        v, t = cfg["visual"], cfg["language"]
        vision = VisionConfig(
            image_size=v.get("image_size", 448),
            patch_size=v.get("patch_size", 14),
            width=v["width"],
            layers=v["layers"],
            head_width=v.get("head_width", 64),
            mlp_ratio=v.get("mlp_ratio", 4.0),
            embed_dim=v.get("embed_dim", 1024),
        )
        for key, expected in (("postnorm", True), ("xattn", False)):
            if key in v and v[key] != expected:
                raise ValueError(f"visual.{key}={v[key]} is not supported (InfiMM-HD uses {expected})")
        text = TextConfig(
            vocab_size=t["vocab_size"],
            hidden=t["hidden_size"],
            layers=t["num_hidden_layers"],
            heads=t["num_attention_heads"],
            kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            intermediate=t["intermediate_size"],
            rms_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=t.get("rope_theta", 10000.0),
            max_positions=t.get("max_position_embeddings", 4096),
            bos_token_id=t.get("bos_token_id", 1),
            eos_token_id=t.get("eos_token_id", 2),
            pad_token_id=t.get("pad_token_id") or 0,
        )
        if t.get("rope_scaling"):
            raise ValueError(f"language.rope_scaling={t['rope_scaling']} is not supported")
        if t.get("tie_word_embeddings"):
            raise ValueError("language.tie_word_embeddings=true is not supported (Vicuna unties lm_head)")
        xattn_kw = {k: v for k, v in cfg.get("cross_attn", {}).items() if k in ("heads", "dim_head", "ff_mult")}
        xattn = CrossAttnConfig(every_n_layers=cfg.get("cross_attn_every_n_layers", 4), **xattn_kw)
        return cls(
            vision=vision,
            text=text,
            xattn=xattn,
            image_token_id=cfg["image_token_id"],
            eoc_token_id=cfg["eoc_token_id"],
            pe_max_pos=cfg.get("pe_max_pos", 64),
        )

    def to_hf_config(self) -> dict:
        v, t = self.vision, self.text
        return {
            "architectures": ["InfiMMHDModel"],
            "auto_map": {
                "AutoConfig": "configuration_infimm_hd.InfiMMHDConfig",
                "AutoModelForCausalLM": "modeling_infimm_hd.InfiMMHDModel",
            },
            "model_type": "infimm-hd",
            "seq_length": t.max_positions,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_flash_attn": False,
            "cross_attn_every_n_layers": self.xattn.every_n_layers,
            "freeze_llm": True,
            "image_token_id": self.image_token_id,
            "eoc_token_id": self.eoc_token_id,
            "pe_max_pos": self.pe_max_pos,
            "visual": {
                "image_size": v.image_size,
                "layers": v.layers,
                "width": v.width,
                "head_width": v.head_width,
                "patch_size": v.patch_size,
                "mlp_ratio": v.mlp_ratio,
                "drop_path_rate": 0.0,
                "xattn": False,
                "postnorm": True,
                "fusedLN": False,
                "embed_dim": v.embed_dim,
            },
            "language": {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id,
                "pad_token_id": t.pad_token_id,
                "hidden_act": "silu",
                "hidden_size": t.hidden,
                "intermediate_size": t.intermediate,
                "max_position_embeddings": t.max_positions,
                "num_attention_heads": t.heads,
                "num_hidden_layers": t.layers,
                "num_key_value_heads": t.kv_heads,
                "rms_norm_eps": t.rms_eps,
                "rope_theta": t.rope_theta,
                "rope_scaling": None,
                "tie_word_embeddings": False,
                "vocab_size": t.vocab_size,
            },
            "cross_attn": {"heads": self.xattn.heads, "dim_head": self.xattn.dim_head, "ff_mult": self.xattn.ff_mult},
        }

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InfiMMHDConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no config.json in {path}; is this an InfiMM-HD checkpoint folder?")
        return cls.from_hf_config(json.loads(file.read_text()))

    def replace(self, **changes) -> InfiMMHDConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, InfiMMHDConfig] = {
    "infimm-hd-13b": InfiMMHDConfig(),
    # Small enough for CPU tests and demos: the shapes of the golden vectors' model (tests/data/golden/config.json)
    # except the cross-attention width (4 x 16 instead of the official 12 x 64: at the official width the media keys
    # and values are 24x the size of this decoder and dominate every CPU run), with the vocabulary of the tiny
    # tokenizer that `weights.make_tiny_checkpoint` builds.
    "tiny": InfiMMHDConfig(
        vision=VisionConfig(width=64, layers=2, head_width=16, mlp_ratio=2.6875, embed_dim=32),
        text=TextConfig(vocab_size=512, hidden=64, layers=8, heads=4, kv_heads=4, intermediate=160, max_positions=1024),
        xattn=CrossAttnConfig(heads=4, dim_head=16),
        image_token_id=511,
        eoc_token_id=510,
    ),
    # The decoder of the engine-vs-vLLM CPU benchmark (`benchmarks/vllm_cpu.py`): a 168 M-parameter Llama (hidden
    # 1024, 8 layers, 16 heads, ffn 2816, the official vocabulary), with the tiny ViT and cross-attention. Text-only
    # prompts skip the cross-attention, so the same decoder weights load into vLLM as a `LlamaForCausalLM`.
    "bench-168m": InfiMMHDConfig(
        vision=VisionConfig(width=64, layers=2, head_width=16, mlp_ratio=2.6875, embed_dim=32),
        text=TextConfig(hidden=1024, layers=8, heads=16, kv_heads=16, intermediate=2816, max_positions=2048),
        xattn=CrossAttnConfig(heads=4, dim_head=16),
    ),
}


@dataclass(frozen=True)
class EngineConfig:
    """The generation engine (`engine.py`): slots, batching limits, hot-path switches and memory."""

    max_slots: int = 8  # sequences decoded together
    max_seq_len: int = 1024  # prompt + new tokens per slot
    max_views: int | None = None  # views of the image a slot keeps for decoding; None: the processor's max_windows + 1
    vit_batch_views: int = 32  # views per ViT forward (bounds activation memory)
    max_prefill_batch: int = 16  # requests admitted and prefilled together (bounds transient media K/V memory)
    feature_cache_mb: int = 1024  # LRU of encoded pages by `PageViews.cache_key`
    cuda_graphs: bool = True  # capture decode steps on CUDA (ignored on CPU)
    kv_bucket: int = 32  # decode attends to a multiple of this many columns (finer: less read; coarser: fewer graphs)
    # Eager decode steps (CPU, or CUDA without graphs) attend over each slot's own length: neighbouring slots are
    # grouped into ranges, each reading up to its longest slot (a range of one slot: exactly its keys, no mask); a new
    # range costs one more attention call, worth `decode_split_bytes` of keys read. "bucket": one call up to the
    # longest slot rounded to kv_bucket, masked (what CUDA graphs always use: their shapes are fixed).
    decode_attention: str = "own_length"  # own_length | bucket
    decode_split_bytes: int = 256 * 1024
    # Hot-path switches. Each gives the same tokens on or off (tests/test_engine.py); benchmarks/gpu.py measures each.
    interleave_vit: bool = True  # encode at most `vit_step_views` views per step, decoding the running slots between
    vit_step_views: int = 64  # (whole pages, at least one) so decode never waits for the ViT of a whole admission
    dense_attention: bool = True  # no mask where every query may attend every key (lets SDPA use flash kernels)
    packed_prefill: bool = True  # prompts packed back to back (real tokens only); off: padded to the longest, masked
    media_align: int = 128  # media buffers, and media lengths decoded with a mask, padded to a multiple of this
    precompute: bool = True  # RoPE cos/sin cast once per step, gate tanh once per engine (not in every layer)
    fused_norm: bool = True  # RMSNorm through F.rms_norm (1 reduction kernel instead of 5 element-wise ones)
    compile: bool = False  # torch.compile RMSNorm and SwiGLU (compile time dominates on the CPU)
    cpu_packed_linear: bool = True  # CPU: decoder and LM-head linears via oneDNN, weights packed once (cpu_linear.py)
    vocab_pad: int = 64  # output GEMM over the vocabulary padded to a multiple of this (logits sliced back); 0: off
    late_copy: bool | None = None  # sampled ids copied to the host one step late (None: on CUDA only); see _decode
    # Memory (model/quantize.py, model/memory.py): weights quantized while loading; with gpu_memory_utilization the
    # engine sizes max_slots, vit_batch_views and max_prefill_batch (then upper bounds) to that fraction of the card.
    quantize: str = "none"  # none | int8 | int4 | fp8
    gpu_memory_utilization: float | None = None
    gpu_memory_bytes: int | None = None  # the card's size to plan for (default: the CUDA device's total)
