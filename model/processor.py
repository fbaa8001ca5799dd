"""Prompt processor: chat template, `<image>` placeholders, tokenizer, and page image -> views.

Prompt forms (spec §5 lists what is uncertain about the official processor), selectable by name:
* "vicuna" (default): `{system} USER: <image>{question} ASSISTANT:` with the Vicuna v1.5 system prompt; the form of the
  golden generation case and of the official training data (`demo_forward.py`).
* "vicuna-hf": the sibling HF processors' form, empty system prompt and `<|endofchunk|><image>` per image.
Multi-turn chats render each user turn as ` USER: ...` and each assistant turn as ` ASSISTANT: ...<|endofchunk|>`
(the training format), then ` ASSISTANT:` to ask for the answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import InfiMMHDConfig
from .tokenizer import EOC_TOKEN, IMAGE_TOKEN, load_tokenizer
from .windows import PageViews, WindowConfig, normalize_views, prepare_image

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class PromptFormat:
    system: str = VICUNA_SYSTEM
    user: str = " USER: "
    assistant: str = " ASSISTANT:"
    image: str = IMAGE_TOKEN  # what each image becomes in the text
    end_of_turn: str = EOC_TOKEN  # after each earlier assistant answer

    @classmethod
    def named(cls, name: str) -> PromptFormat:
        forms = {"vicuna": cls(), "vicuna-hf": cls(system="", image=EOC_TOKEN + IMAGE_TOKEN)}
        if name not in forms:
            raise ValueError(f"unknown prompt format {name!r}; choose one of {sorted(forms)}")
        return forms[name]


@dataclass
class ChatMessage:
    """One turn: `parts` is a list of strings and images (anything `prepare_image` takes, or ready PageViews)."""

    role: str
    parts: list = field(default_factory=list)


@dataclass
class Inputs:
    input_ids: torch.Tensor  # (1, T)
    attention_mask: torch.Tensor  # (1, T)
    images: list[PageViews]  # in prompt order

    def pixel_views(self, i: int = 0, dtype=torch.float32) -> torch.Tensor:
        """Normalised (V, 3, 448, 448) views of image i, ready for `InfiMMHD.encode_views`."""
        return normalize_views(self.images[i].views, dtype)


def checkpoint_windows(checkpoint: str | Path, windows: WindowConfig = WindowConfig()) -> WindowConfig:
    """`windows` with the window size a checkpoint's ViT takes (config.json `visual.image_size`: 448 for InfiMM-HD,
    224 for the demo reader); views of any other size cannot go through its patch embedding. Everything that cuts
    pages for a checkpoint (engine, batch decode stage, Serve ingress) derives its settings here."""
    return windows_for(InfiMMHDConfig.from_pretrained(checkpoint), windows)


def windows_for(config: InfiMMHDConfig, windows: WindowConfig = WindowConfig()) -> WindowConfig:
    size = config.vision.image_size
    if windows.window == size:
        return windows
    return dataclasses.replace(windows, window=size, max_side=max(size, windows.max_side * size // windows.window))


class Processor:
    def __init__(
        self,
        tokenizer,
        config: InfiMMHDConfig,
        windows: WindowConfig = WindowConfig(),
        prompt: PromptFormat = PromptFormat(),
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.windows = windows_for(config, windows)  # the window is the ViT's input size, whatever was asked
        self.prompt = prompt
        for token, expected in ((IMAGE_TOKEN, config.image_token_id), (EOC_TOKEN, config.eoc_token_id)):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != expected:
                raise ValueError(f"tokenizer maps {token} to {got} but the model config expects {expected}")

    @classmethod
    def from_pretrained(
        cls, path: str | Path, windows: WindowConfig = WindowConfig(), prompt: str | PromptFormat = "vicuna"
    ):
        prompt = PromptFormat.named(prompt) if isinstance(prompt, str) else prompt
        return cls(load_tokenizer(path), InfiMMHDConfig.from_pretrained(path), windows, prompt)

    # ---- text --------------------------------------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at `<|endofchunk|>` (official default) or `</s>` (the LM's eos)."""
        return [self.config.eoc_token_id, self.config.text.eos_token_id]

    def render(self, messages: list[ChatMessage]) -> str:
        """Chat turns -> prompt text with one image placeholder per image, ending with the assistant cue."""
        return self._render(messages)[0]

    def _render(self, messages: list[ChatMessage]) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the character spans that came from the caller's messages (untrusted text)."""
        p = self.prompt
        system: list = [p.system]
        pieces: list = []  # str = template text; tuple(text,) = caller text

        def body(m):
            out = []
            for x in m.parts:
                out.append((x,) if isinstance(x, str) else p.image)
            # strip the turn's outer whitespace, as the template does
            while out and isinstance(out[0], tuple) and not out[0][0].strip():
                out.pop(0)
            if out and isinstance(out[0], tuple):
                out[0] = (out[0][0].lstrip(),)
            if out and isinstance(out[-1], tuple):
                out[-1] = (out[-1][0].rstrip(),)
            return out

        for m in messages:
            if m.role == "system":
                system = body(m)
            elif m.role == "user":
                pieces += [p.user, *body(m)]
            elif m.role == "assistant":
                pieces += [p.assistant + " ", *body(m), p.end_of_turn]
            else:
                raise ValueError(f"unknown role {m.role!r}; use system, user or assistant")
        text, spans = "", []
        for piece in [*system, *pieces, p.assistant]:
            if isinstance(piece, tuple):
                spans.append((len(text), len(text) + len(piece[0])))
                text += piece[0]
            else:
                text += piece
        return text, spans

    def encode_prompt(self, text: str, untrusted: list[tuple[int, int]]) -> list[int]:
        """Tokenize a rendered prompt; control tokens (`</s>`, `<image>`, ...) typed inside caller text are kept as
        plain text, so a client cannot end a turn or add an image placeholder by typing one."""
        tok = self.tokenizer
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        special = set(tok.all_special_ids) | {self.config.image_token_id, self.config.eoc_token_id}
        ids = []
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if i in special and b > a and any(s <= a and b <= e for s, e in untrusted):
                ids += tok(text[a:b], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            else:
                ids.append(i)
        return ids

    def question_prompt(self, question: str, n_images: int = 1) -> str:
        return self.render([ChatMessage("user", [None] * n_images + [question])])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]  # BOS prepended, no EOS

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pad(self, sequences: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists to one (B, T) tensor and mask; left padding for generation, right for training-style forward."""
        T = max(len(s) for s in sequences)
        pad = self.config.text.pad_token_id
        ids = torch.full((len(sequences), T), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), T), dtype=torch.long)
        for i, s in enumerate(sequences):
            span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, span] = torch.tensor(s, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    # ---- text + images -----------------------------------------------------------------------------------------------
    def chat(self, messages: list[ChatMessage]) -> Inputs:
        images = [
            x if isinstance(x, PageViews) else prepare_image(x, self.windows)
            for m in messages
            for x in m.parts
            if not isinstance(x, str)
        ]
        ids = self.encode_prompt(*self._render(messages))
        n_placeholders = ids.count(self.config.image_token_id)
        assert n_placeholders == len(images), f"{n_placeholders} {IMAGE_TOKEN} tokens for {len(images)} images"
        t = torch.tensor([ids], dtype=torch.long)
        return Inputs(input_ids=t, attention_mask=torch.ones_like(t), images=images)

    def __call__(self, image, question: str) -> Inputs:
        """One page and one question -> Inputs (the common document job)."""
        return self.chat([ChatMessage("user", [image, question])])
