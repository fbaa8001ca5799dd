"""Tokenizer loading, and a tiny Llama-style tokenizer built on the spot for random-weight demo checkpoints.

The real checkpoint ships a Llama-2 sentencepiece tokenizer plus `<|endofchunk|>` (32000) and `<image>` (32001); it is
loaded with `transformers.AutoTokenizer` from the checkpoint folder (or its `tokenizer/` subfolder). Model weights and
tokenizers cannot be downloaded here, so demos and tests build a small tokenizer of the same kind: BPE over `▁`-marked
words with byte fallback (any UTF-8 text round-trips), BOS prepended, the two InfiMM special tokens appended last.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>")
EOC_TOKEN, IMAGE_TOKEN = "<|endofchunk|>", "<image>"

# A few paragraphs in the register of the documents this service reads; the tiny BPE learns its merges here.
_CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and
polite answers to the user's questions. USER: What is written on this page? ASSISTANT: The page is an invoice.
Transcribe the text of this document page exactly. Keep the reading order, the headings and the tables.
INVOICE No. 2024-0117  Date: 12 March 2024  Customer: Northwind Traders, 42 Harbour Road, Springfield.
Item  Quantity  Unit price  Total.  Paper, A4, 80 g  10  4.50  45.00.  Toner cartridge  2  61.00  122.00.
Subtotal 167.00  Tax 20% 33.40  Amount due 200.40. Payment within thirty days of the invoice date.
Minutes of the meeting of the board. Present: the chair, the secretary, the treasurer and four members.
The report of the previous meeting was read and approved. The treasurer presented the accounts for the year.
Chapter one. It was a bright cold day in April, and the clocks were striking thirteen. The letter on the table
was addressed to the director of the museum, who read it twice before answering the question of the visitor.
Table 3: results of the survey by region and year. North 1,204 1,377; South 980 1,012; East 655 702; West 811 840.
Figure 2 shows the number of pages scanned per hour on each of the machines during the first week of the project.
"""


def build_tiny_tokenizer(base_vocab: int = 510):
    """A `tokenizers.Tokenizer` with exactly `base_vocab` ordinary tokens, then `<|endofchunk|>`, `<image>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_bytes = 256
    n_learned = base_vocab - len(SPECIALS) - n_bytes
    if n_learned < 64:
        raise ValueError(
            f"base_vocab={base_vocab} leaves no room for learned tokens (need >= {len(SPECIALS) + 256 + 64})"
        )
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")

    # 1. learn merges on the corpus (deterministic for a fixed corpus)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre
    learner.train_from_iterator([_CORPUS], trainers.BpeTrainer(vocab_size=n_learned, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    learned_tokens = sorted(learned["vocab"], key=learned["vocab"].get)

    # 2. final vocabulary, Llama order: specials, 256 byte tokens, learned pieces, filler up to base_vocab
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(n_bytes):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok in learned_tokens:
        if tok not in vocab and len(vocab) < base_vocab:
            vocab[tok] = len(vocab)
    while len(vocab) < base_vocab:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(list(SPECIALS) + [EOC_TOKEN, IMAGE_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tok.token_to_id(EOC_TOKEN) == base_vocab and tok.token_to_id(IMAGE_TOKEN) == base_vocab + 1, (
        "the special tokens must follow the base vocabulary, as in the official tokenizer"
    )
    return tok


def save_tiny_tokenizer(folder: str | Path, base_vocab: int = 510) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json loadable by AutoTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(base_vocab).save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    extra = {"additional_special_tokens": [EOC_TOKEN, IMAGE_TOKEN]}
    (folder / "special_tokens_map.json").write_text(json.dumps({**specials, **extra}, indent=2))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "right", "model_max_length": 4096}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **specials, **extra}, indent=2))


def tokenizer_dir(checkpoint: str | Path) -> Path:
    """The folder holding the tokenizer files of a checkpoint: `<ckpt>/tokenizer/` if present, else `<ckpt>`."""
    checkpoint = Path(checkpoint)
    sub = checkpoint / "tokenizer"
    return sub if sub.is_dir() else checkpoint


def load_tokenizer(checkpoint: str | Path):
    from transformers import AutoTokenizer

    folder = tokenizer_dir(checkpoint)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}")
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token  # Vicuna v1.5 convention: pad = <unk> = 0
    return tok
