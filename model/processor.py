"""Prompt processor: chat template, `<image>` placeholders, tokenizer, and page image -> views.

Prompt forms (spec §5 lists what is uncertain about the official processor), selectable by name:
* "vicuna" (default): `{system} USER: <image>{question} ASSISTANT:` with the Vicuna v1.5 system prompt; the form of the
  golden generation case and of the official training data (`demo_forward.py`).
* "vicuna-hf": the sibling HF processors' form, empty system prompt and `<|endofchunk|><image>` per image.
Multi-turn chats render each user turn as ` USER: ...` and each assistant turn as ` ASSISTANT: ...<|endofchunk|>`
(the training format), then ` ASSISTANT:` to ask for the answer.
"""

from __future__ import annotations

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
    def named(cls, name: str) -> "PromptFormat":
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


class Processor:
    def __init__(self, tokenizer, config: InfiMMHDConfig, windows: WindowConfig = WindowConfig(),
                 prompt: PromptFormat = PromptFormat()):  # fmt: skip
        self.tokenizer = tokenizer
        self.config = config
        self.windows = windows
        self.prompt = prompt
        for token, expected in ((IMAGE_TOKEN, config.image_token_id), (EOC_TOKEN, config.eoc_token_id)):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != expected:
                raise ValueError(f"tokenizer maps {token} to {got} but the model config expects {expected}")

    @classmethod
    def from_pretrained(cls, path: str | Path, windows: WindowConfig = WindowConfig(), prompt: str | PromptFormat = "vicuna"):
        prompt = PromptFormat.named(prompt) if isinstance(prompt, str) else prompt
        return cls(load_tokenizer(path), InfiMMHDConfig.from_pretrained(path), windows, prompt)

    # ---- text ---------------------------------------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at `<|endofchunk|>` (official default) or `</s>` (the LM's eos)."""
        return [self.config.eoc_token_id, self.config.text.eos_token_id]

    def render(self, messages: list[ChatMessage]) -> str:
        """Chat turns -> prompt text with one image placeholder per image, ending with the assistant cue."""
        p = self.prompt
        system = p.system
        text = ""
        for m in messages:
            body = "".join(p.image if not isinstance(x, str) else x for x in m.parts)
            if m.role == "system":
                system = body
            elif m.role == "user":
                text += p.user + body.strip()
            elif m.role == "assistant":
                text += p.assistant + " " + body.strip() + p.end_of_turn
            else:
                raise ValueError(f"unknown role {m.role!r}; use system, user or assistant")
        return system + text + p.assistant

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

    # ---- text + images ------------------------------------------------------------------------------------------------
    def chat(self, messages: list[ChatMessage]) -> Inputs:
        images = [x if isinstance(x, PageViews) else prepare_image(x, self.windows)
                  for m in messages for x in m.parts if not isinstance(x, str)]  # fmt: skip
        ids = self.encode(self.render(messages))
        n_placeholders = ids.count(self.config.image_token_id)
        if n_placeholders != len(images):
            raise ValueError(f"prompt has {n_placeholders} {IMAGE_TOKEN} tokens for {len(images)} images; do not type "
                             f"{IMAGE_TOKEN} in text, it is added for each image")  # fmt: skip
        t = torch.tensor([ids], dtype=torch.long)
        return Inputs(input_ids=t, attention_mask=torch.ones_like(t), images=images)

    def __call__(self, image, question: str) -> Inputs:
        """One page and one question -> Inputs (the common document job)."""
        return self.chat([ChatMessage("user", [image, question])])
