"""Official checkpoint loading and conversion, and the tiny random checkpoint builder.

Official layout (spec §6): every key starts with `model.` (the HF wrapper's child `Flamingo`):
  model.vision_encoder.*                                           EVA ViT (same names as `vision.py`)
  model.lang_encoder.model.embed_tokens.weight / .norm.weight / lm_head.weight
  model.lang_encoder.model.layers.{i}.decoder_layer.*              LlamaDecoderLayer
  model.lang_encoder.model.layers.{i}.gated_cross_attn_layer.*     gated cross-attention block (i = 3, 7, ...)
plus ALIASES of the same tensors, registered a second time by the official `FlamingoLMMixin`:
  model.lang_encoder.old_decoder_blocks.{i}.*      == ...model.layers.{i}.decoder_layer.*
  model.lang_encoder.gated_cross_attn_layers.{i}.* == ...model.layers.{i}.gated_cross_attn_layer.*
Stage-1 checkpoints are a bare `Flamingo` state dict (no `model.` prefix); both are accepted.

Loading builds the model on the meta device and assigns the checkpoint tensors (memory-mapped, converted one at a time),
so two full copies never exist. q/k/v and gate/up are concatenated into the fused projections here.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import InfiMMHDConfig
from .infimm import InfiMMHD

LM = "model.lang_encoder."
VISION = "model.vision_encoder."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_ALIASES = (
    (
        re.compile(r"^model\.lang_encoder\.old_decoder_blocks\.(\d+)\."),
        r"model.lang_encoder.model.layers.\1.decoder_layer.",
    ),
    (
        re.compile(r"^model\.lang_encoder\.gated_cross_attn_layers\.(\d+)\."),
        r"model.lang_encoder.model.layers.\1.gated_cross_attn_layer.",
    ),
)
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class CheckpointError(RuntimeError):
    pass


# ---- key plan: internal parameter -> official keys (concatenated along dim 0) ----------------------------------------
def key_plan(cfg: InfiMMHDConfig) -> dict[str, list[str]]:
    plan: dict[str, list[str]] = {}
    with torch.device("meta"):
        model = InfiMMHD(cfg)
    for name, _ in model.vision.named_parameters():
        plan[f"vision.{name}"] = [VISION + name]
    plan["decoder.embed_tokens.weight"] = [LM + "model.embed_tokens.weight"]
    for i in range(cfg.text.layers):
        src = f"{LM}model.layers.{i}.decoder_layer."
        dst = f"decoder.layers.{i}."
        plan[dst + "attn.wqkv.weight"] = [src + f"self_attn.{p}_proj.weight" for p in "qkv"]
        plan[dst + "attn.wo.weight"] = [src + "self_attn.o_proj.weight"]
        plan[dst + "mlp.w_gate_up.weight"] = [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]
        plan[dst + "mlp.w_down.weight"] = [src + "mlp.down_proj.weight"]
        plan[dst + "attn_norm.weight"] = [src + "input_layernorm.weight"]
        plan[dst + "mlp_norm.weight"] = [src + "post_attention_layernorm.weight"]
    for i, block in model.xattn.items():
        for name, _ in block.named_parameters():
            plan[f"xattn.{i}.{name}"] = [f"{LM}model.layers.{i}.gated_cross_attn_layer.{name}"]
    plan["decoder.norm.weight"] = [LM + "model.norm.weight"]
    plan["decoder.lm_head.weight"] = [LM + "lm_head.weight"]
    expected = {n for n, _ in model.named_parameters()}
    assert set(plan) == expected, f"key plan out of date: {sorted(set(plan) ^ expected)[:5]}"
    return plan


def canonical_key(key: str) -> str | None:
    """Official key (any accepted variant) -> its canonical official name; None for keys to skip."""
    if _IGNORED.search(key):
        return None
    if key.startswith(("vision_encoder.", "lang_encoder.")):  # bare Flamingo state dict (stage-1 checkpoints)
        key = "model." + key
    for pattern, repl in _ALIASES:
        key = pattern.sub(repl, key)
    return key


# ---- checkpoint readers ---------------------------------------------------------------------------------------------
class CheckpointReader:
    """Lazy access to the tensors of `pytorch_model.bin`, `model.safetensors` or sharded safetensors in a folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        binary = self.folder / "pytorch_model.bin"
        if index.exists():
            for key, file in json.loads(index.read_text())["weight_map"].items():
                self._where[key] = self.folder / file
        elif single.exists():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self._where = {k: single for k in f.keys()}
        elif binary.exists():
            # weights_only: no code execution from the pickle; mmap: the 36 GB file is paged in, not copied.
            self._bin = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
            if "state_dict" in self._bin and isinstance(self._bin["state_dict"], dict):
                self._bin = self._bin["state_dict"]
            if "module" in self._bin and isinstance(self._bin["module"], dict):  # DeepSpeed model states
                self._bin = self._bin["module"]
        else:
            raise CheckpointError(
                f"no weights in {self.folder}: expected model.safetensors, model.safetensors.index.json or "
                "pytorch_model.bin"
            )
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._bin) if self._bin is not None else list(self._where)

    def get(self, key: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[key]
        return self._handle(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape without reading it."""
        if self._bin is not None:
            return tuple(self._bin[key].shape)
        return tuple(self._handle(key).get_slice(key).get_shape())

    def _handle(self, key: str):
        file = self._where[key]
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    aliases_skipped: int = 0
    ignored: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def block(title, items):
            shown = "\n".join(f"    {k}" for k in items[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"  {title} ({len(items)}):\n{shown}{more}" if items else ""

        parts = [
            block("missing from the checkpoint", self.missing),
            block("unexpected in the checkpoint", self.unexpected),
            block("shape mismatches", self.mismatched),
        ]
        head = "checkpoint matches the model" if self.ok else "checkpoint does not match the model config"
        tail = f"  ({self.aliases_skipped} alias keys skipped, {self.ignored} ignored buffers)"
        return "\n".join([head, *[p for p in parts if p], tail])


def resolve_sources(reader: CheckpointReader) -> tuple[dict[str, str], LoadReport]:
    """canonical official key -> key as stored (canonical names win over aliases)."""
    report = LoadReport()
    stored: dict[str, str] = {}
    for key in reader.keys():
        canon = canonical_key(key)
        if canon is None:
            report.ignored += 1
        elif canon in stored:
            report.aliases_skipped += 1
            if key == canon:  # prefer the canonical spelling when both exist
                stored[canon] = key
        else:
            stored[canon] = key
    return stored, report


# ---- loading ---------------------------------------------------------------------------------------------------------
def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    strict: bool = True,
    quantize: str = "none",
) -> InfiMMHD:
    """Official-layout folder (config.json + weights [+ tokenizer]) -> InfiMMHD in eval mode.

    quantize (`quantize.MODES`): the same strict load, each block quantized as soon as it is on the device.
    """
    from .quantize import check_supported, load_by_unit

    path = Path(path)
    cfg = InfiMMHDConfig.from_pretrained(path)
    check_supported(quantize, device, dtype)  # before reading 36 GB
    reader = CheckpointReader(path)
    stored, report = resolve_sources(reader)
    plan = key_plan(cfg)
    with torch.device("meta"):
        model = InfiMMHD(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    used: set[str] = set()
    found: dict[str, list[str]] = {}  # parameter -> stored keys, checked by shape before any tensor is read
    for name, sources in plan.items():
        if any(s not in stored for s in sources):
            report.missing.extend(s for s in sources if s not in stored)
            continue
        used.update(sources)
        parts = [reader.shape(stored[s]) for s in sources]
        shape = (sum(p[0] for p in parts), *parts[0][1:]) if len(parts) > 1 else parts[0]
        if shape != shapes[name] or len({p[1:] for p in parts}) > 1:
            report.mismatched.append(f"{name}: checkpoint {' + '.join(map(str, parts))} vs model {shapes[name]}")
            continue
        found[name] = sources
    report.unexpected = sorted(set(stored) - used)
    if strict and not report.ok:
        raise CheckpointError(f"{path}:\n{report}")

    def read(name: str) -> torch.Tensor:
        parts = [reader.get(stored[s]) for s in found[name]]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return tensor.to(device=device, dtype=dtype)

    if quantize == "none":
        model.load_state_dict({name: read(name) for name in found}, strict=strict, assign=True)
    else:
        load_by_unit(model, list(found), read, quantize, strict=strict)
    model.decoder.reset_rope(device)  # non-persistent buffer, not in the checkpoint
    model.load_report = report
    return model.eval()


# ---- writing the official layout ------------------------------------------------------------------------------------
def official_state_dict(model: InfiMMHD, aliases: bool = False) -> dict[str, torch.Tensor]:
    """Internal parameters -> official keys (fused projections split again). With aliases, also the duplicate names
    the official code writes (as separate tensors: safetensors cannot store shared storage)."""
    cfg = model.config
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, sources in key_plan(cfg).items():
        t = params[name].detach()
        if len(sources) == 1:
            out[sources[0]] = t
            continue
        sizes = _split_sizes(name, cfg)
        for src, part in zip(sources, t.split(sizes, dim=0), strict=True):
            out[src] = part
    if aliases:
        for key in list(out):
            for pattern, alias in (
                (
                    re.compile(r"^model\.lang_encoder\.model\.layers\.(\d+)\.decoder_layer\."),
                    r"model.lang_encoder.old_decoder_blocks.\1.",
                ),
                (
                    re.compile(r"^model\.lang_encoder\.model\.layers\.(\d+)\.gated_cross_attn_layer\."),
                    r"model.lang_encoder.gated_cross_attn_layers.\1.",
                ),
            ):
                if pattern.match(key):
                    out[pattern.sub(alias, key)] = out[key].clone()
    return out


def _split_sizes(name: str, cfg: InfiMMHDConfig) -> list[int]:
    t = cfg.text
    if name.endswith("wqkv.weight"):
        return [t.heads * t.head_dim, t.kv_heads * t.head_dim, t.kv_heads * t.head_dim]
    if name.endswith("w_gate_up.weight"):
        return [t.intermediate, t.intermediate]
    raise AssertionError(name)


def save_sharded(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int, dtype: torch.dtype | None) -> int:
    """Write `state` as safetensors shards of about shard_bytes (+ index when more than one); returns the count."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * (t.element_size() if dtype is None else torch.tensor([], dtype=dtype).element_size())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        # contiguous copies: checkpoint tensors may be views into one mmapped storage, which safetensors refuses
        chunk = {k: state[k].to(dtype or state[k].dtype).contiguous().clone() for k in keys}
        save_file(chunk, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del chunk
    if len(shards) > 1:
        total = sum(t.numel() * (t.element_size() if dtype is None else 2) for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return len(shards)


def copy_tokenizer(src: Path, dst: Path) -> None:
    from .tokenizer import tokenizer_dir

    folder = tokenizer_dir(src)
    target = dst / "tokenizer" if folder != src else dst
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copy2(folder / name, target / name)


def convert_checkpoint(
    src: str | Path, dst: str | Path, shard_gb: float = 5.0, dtype: torch.dtype | None = None
) -> LoadReport:
    """Official checkpoint (pickle or safetensors, aliases or not) -> sharded safetensors with canonical official keys,
    config.json and tokenizer. Tensors are streamed shard by shard; the source stays memory-mapped."""
    src, dst = Path(src), Path(dst)
    cfg = InfiMMHDConfig.from_pretrained(src)
    reader = CheckpointReader(src)
    stored, report = resolve_sources(reader)
    needed = [s for sources in key_plan(cfg).values() for s in sources]
    report.missing = [k for k in needed if k not in stored]
    report.unexpected = sorted(set(stored) - set(needed))
    if not report.ok:
        raise CheckpointError(f"{src}:\n{report}")
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: reader.get(stored[k]) for k in needed}
    save_sharded(state, dst, int(shard_gb * 2**30), dtype)
    hf = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(hf, indent=2))
    copy_tokenizer(src, dst)
    return report


# ---- tiny random checkpoints ----------------------------------------------------------------------------------------
def init_random_(model: InfiMMHD, seed: int) -> None:
    """Random weights as the golden vectors' recipe: gates far from 0 so the cross-attention matters."""
    g = torch.Generator().manual_seed(seed)

    def normal(p, std, mean=0.0):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std + mean)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("attn_gate", "ff_gate", "cls_token", "pos_embed")):
            normal(p, 0.5)
        elif leaf in ("q_bias", "v_bias"):
            normal(p, 0.2)
        elif "embed_tokens" in name:
            normal(p, 1.0)
        elif p.ndim == 1 and leaf == "weight":  # LayerNorm / RMSNorm
            normal(p, 0.1, 1.0)
        elif leaf == "bias":
            normal(p, 0.1)
        else:  # Linear / Conv: fan_in scaling
            normal(p, p[0].numel() ** -0.5)


def make_tiny_checkpoint(folder: str | Path, seed: int = 0, preset: str = "tiny", fmt: str = "safetensors") -> Path:
    """Write a RANDOM-WEIGHT checkpoint in the official layout (aliases included, bf16 like the real one) with a
    config.json and a tokenizer built on the spot. For demos and tests only: its output is noise."""
    from safetensors.torch import save_file

    from .tokenizer import save_tiny_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = InfiMMHDConfig.preset(preset)
    model = InfiMMHD(cfg)
    init_random_(model, seed)
    with torch.no_grad():
        # Cosmetic, for demos: random weights pick the 256 byte-fallback pieces (ids 3..258 of the tiny tokenizer) as
        # often as word pieces, and stray bytes print as U+FFFD. Zero logits for them make the noise read as words.
        model.decoder.lm_head.weight[3 : 3 + 256] = 0
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in official_state_dict(model, aliases=True).items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    save_tiny_tokenizer(folder / "tokenizer", base_vocab=cfg.eoc_token_id)
    (folder / "RANDOM_WEIGHTS.txt").write_text(
        f"Random weights (seed {seed}, preset {preset!r}) made by `infimm-hd make-tiny-checkpoint`.\n"
        "This checkpoint has the official InfiMM-HD layout but knows nothing: its text is noise.\n"
    )
    return folder


def is_random_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / "RANDOM_WEIGHTS.txt").exists()
