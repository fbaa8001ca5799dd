"""Incremental detokenization: token ids in, text deltas out, whose concatenation equals a full decode.

Text handling, not sampling: sentencepiece's leading-space rule, byte-fallback runs (multi-byte characters) and stop
strings held back until decided. The engine keeps one `IncrementalDetokenizer` per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def byte_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the byte-fallback pieces `<0x00>`..`<0xFF>` (Llama's sentencepiece convention); empty if none."""
    names = [f"<0x{b:02X}>" for b in range(256)]
    ids = tokenizer.convert_tokens_to_ids(names)
    unk = getattr(tokenizer, "unk_token_id", None)
    return frozenset(i for i, name in zip(ids, names, strict=True) if i is not None and i != unk)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation equals `decode(all ids)`.

    Decodes a short window [prefix, end) and emits what the newest tokens add to the window [prefix, read): this keeps
    sentencepiece's leading-space rule correct. Byte-fallback tokens (`<0xE4>`...) are held back until a normal token
    follows, because the tokenizer decodes a run of them as one unit (a run that is not valid UTF-8 becomes U+FFFD per
    token, even for bytes that would be valid alone). Stop strings are held back until they can no longer start in the
    pending text, so streamed deltas never contain text that is later cut.
    """

    tokenizer: object
    stop: tuple[str, ...] = ()
    byte_ids: frozenset[int] = frozenset()  # see byte_token_ids()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (may include a stop string; see `visible`)
    emitted: int = 0  # characters of `text` already handed out as deltas
    prefix: int = 0
    read: int = 0
    stopped_at: int | None = None  # index in `text` where a stop string begins

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show (may be empty)."""
        self.ids.append(token_id)
        if token_id in self.byte_ids:
            return ""  # the byte run is decided when it ends
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        self._find_stop()
        return self._take(final=False)

    def finish(self) -> str:
        """Flush what is left at the end of generation: bytes that never completed a character (they decode to
        U+FFFD, as in a full decode) and the tail held back for stop strings."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before):
            self.text += after[len(before) :]
            self.prefix = self.read = len(self.ids)
            self._find_stop()
        return self._take(final=True)

    def _find_stop(self) -> None:
        if self.stop and self.stopped_at is None:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped_at = min(hits)

    @property
    def visible(self) -> str:
        return self.text if self.stopped_at is None else self.text[: self.stopped_at]

    def _take(self, final: bool) -> str:
        end = len(self.visible)
        if not final and self.stop and self.stopped_at is None:
            end = max(self.emitted, end - (max(len(s) for s in self.stop) - 1))  # a stop string may still start here
        delta = self.visible[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta
