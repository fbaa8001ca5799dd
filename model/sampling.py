"""Sampling parameters, the batched logits pipeline, token sampling and stop conditions (incremental
detokenization: `detokenize.py`, re-exported here).

Legend: S decode slots, B rows of a step, V vocabulary, W = ceil(V / 32) bitmask words.

Per-request reproducibility: every sampled request owns a `torch.Generator` seeded from its `seed` and draws exactly one
sample per generated token, so its output does not depend on what else shares the batch.

The logits of a step go through `BatchSampler.sample` in this order (penalties, bias, bans, then the sampling warpers):
    raw logits (B, V)
    -> repetition_penalty (HF/CTRL: seen in prompt + output: positive / p, negative * p)
    -> - frequency_penalty * count - presence_penalty * (count > 0)   (OpenAI; counts over generated tokens only)
    -> + logit_bias
    -> JSON-schema token mask, then no_repeat_ngram_size bans (-inf; bans that would leave the grammar nothing are
       dropped for that step)
    = "processed logits": greedy takes their argmax; logprobs are their log_softmax
    -> / temperature, top-k, top-p -> multinomial with the request's generator
Logprobs are therefore the model's distribution after penalties, bias and bans but before temperature and top-k/top-p:
a choice (vLLM reports the raw distribution by default): it is what the sampler drew from, so a greedy token is always
its own top_logprobs[0], and a temperature of 0 does not make every logprob 0 or -inf. Each step is a few batched
ops over the rows that ask for them, with per-slot tensors preallocated in `BatchSampler`; a row without penalties,
bias, bans or logprobs costs nothing extra, so default requests produce exactly the ids they always did.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# re-exported: the detokenizer lived here before it got its own module
from .detokenize import IncrementalDetokenizer as IncrementalDetokenizer
from .detokenize import byte_token_ids as byte_token_ids

log = logging.getLogger(__name__)

JSON_OBJECT = '{"type": "object"}'  # `json_schema` for OpenAI's response_format={"type": "json_object"}
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (`SamplingParams.greedy`)
# JSON layout the grammar allows: Python's json.dumps spacing, no free whitespace (random or weak models otherwise fill
# the budget with blanks between tokens); a schema may override it with its own "x-guidance" options.
JSON_GRAMMAR_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")


def _check_float(name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's defaults (<|endofchunk|>, </s>)
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    min_new_tokens: int = 0  # stop tokens are ignored until this many tokens exist (to force a length)
    # -- penalties and bias (see the module docstring for the order) --
    repetition_penalty: float = 1.0  # HF/CTRL, over prompt + output tokens; > 1 discourages repeats; 1 = off
    presence_penalty: float = 0.0  # OpenAI, [-2, 2]: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI, [-2, 2]: subtracted once per time a token was generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]); a dict (JSON str keys too) is ok
    no_repeat_ngram_size: int = 0  # HF: ban a token that would repeat an n-gram of the generated tokens; 0 = off
    # -- constrained output --
    json_schema: str | None = None  # output is JSON valid for this schema (JSON text or dict); JSON_OBJECT: any object
    # -- logprobs (of the processed logits, see above) --
    logprobs: bool = False  # Result.logprobs: the chosen token's logprob per generated token
    top_logprobs: int = 0  # [0, 20] most likely alternatives per token as well (needs logprobs=True)
    # -- repetition guard: end a degenerate loop with finish_reason="repetition" --
    repetition_guard: bool = False
    repetition_max_period: int = 64  # longest cycle looked for, in tokens
    repetition_min_repeats: int = 4  # the cycle must occur this many times in a row at the end of the output
    repetition_min_tokens: int = 64  # ... and the repeated stretch must be at least this long (short periods)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if (
            isinstance(self.repetition_penalty, bool)
            or not isinstance(self.repetition_penalty, int | float)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        object.__setattr__(self, "logit_bias", _normalize_bias(self.logit_bias))
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be true or false, got {self.logprobs!r}")
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if not isinstance(self.repetition_guard, bool):
            raise ValueError(f"repetition_guard must be true or false, got {self.repetition_guard!r}")
        _check_int("repetition_max_period", self.repetition_max_period, 1)
        _check_int("repetition_min_repeats", self.repetition_min_repeats, 2)
        _check_int("repetition_min_tokens", self.repetition_min_tokens, 2)
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", _normalize_schema(self.json_schema))

    @property
    def greedy(self) -> bool:
        # Below GREEDY_BELOW a draw is all but always the argmax, and float32 logits divided by such a temperature
        # overflow (one under float32's smallest number is 0 to the tensor): inf - inf = nan in the softmax, which
        # failed the engine step of every request in flight. vLLM treats temperatures under 1e-5 as greedy too.
        return self.temperature < GREEDY_BELOW

    @property
    def counts_tokens(self) -> bool:
        """True if the slot's token counts are needed (any of the three penalties is on)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _normalize_bias(bias) -> tuple[tuple[int, float], ...]:
    items = bias.items() if isinstance(bias, Mapping) else bias
    out: dict[int, float] = {}
    try:
        pairs = list(items)
    except TypeError:
        raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"logit_bias must map token ids to numbers, got the entry {pair!r}")
        key, value = pair
        if isinstance(key, str) and key.isascii() and key.isdigit():  # JSON object keys are strings
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        _check_float(f"logit_bias[{key}]", value, -100.0, 100.0)
        if key in out:
            raise ValueError(f"logit_bias has token id {key} twice")
        out[key] = float(value)
    return tuple(sorted(out.items()))


def _normalize_schema(schema) -> str:
    """JSON schema (text or dict) -> JSON text; checked by compiling it, so a bad schema fails before any work."""
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except json.JSONDecodeError as err:
            raise ValueError(f"json_schema is not valid JSON: {err}") from None
    else:
        parsed = schema
    if not isinstance(parsed, dict):
        raise ValueError(f"json_schema must be a JSON object (a schema), got {type(parsed).__name__}")
    text = json.dumps(parsed)  # key order kept: the grammar emits properties in schema order
    message = _llguidance().LLMatcher.validate_grammar(json_grammar(text))
    if message and not message.startswith("WARNING"):
        raise ValueError(f"json_schema cannot be compiled: {message}")
    return text


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a declared dependency; only a broken install lands here
        raise ValueError("json_schema needs the llguidance package (pip install llguidance)") from None
    return llguidance


def json_grammar(schema_text: str) -> str:
    return _llguidance().LLMatcher.grammar_from_json_schema(schema_text, defaults=JSON_GRAMMAR_OPTIONS)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(V,) float32 logits -> temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """logits (B, V) float32 -> one token per row (greedy rows batched, sampled rows with their own generator)."""
    tokens = logits.argmax(-1)
    for row, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            probs = filter_logits(logits[row], p).softmax(-1)
            tokens[row] = torch.multinomial(probs, 1, generator=g)[0]
    return tokens.tolist()


# ---- per-request state, logprobs, the batched pipeline ---------------------------------------------------------------
@dataclass
class TopLogprob:
    token_id: int
    token: str  # the piece as text ("▁" -> " "); a byte-fallback piece that is not a character alone is "\\xNN"
    bytes: list[int]  # its UTF-8 bytes (the raw byte for a byte-fallback piece), as OpenAI's `bytes`
    logprob: float


@dataclass
class TokenLogprob(TopLogprob):
    """One generated token: its logprob and the `top_logprobs` most likely tokens at that step (sorted, best first;
    tokens banned at that step, logprob -inf, are left out)."""

    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class SequenceState:
    """Host-side sampling state of one request: generator, n-gram table, repetition guard, grammar matcher, logprobs."""

    params: SamplingParams
    generator: torch.Generator | None = None
    matcher: object | None = None  # llguidance.LLMatcher when json_schema is set
    tokens: list[int] = field(default_factory=list)  # generated ids (kept only for n-gram bans and the guard)
    ngrams: dict[tuple[int, ...], set[int]] = field(default_factory=dict)  # (n-1)-gram -> tokens that followed it
    runs: list[int] = field(default_factory=list)  # runs[p]: consecutive i with tokens[i] == tokens[i - p]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    repeating: bool = False  # the guard saw a loop: finish with "repetition"
    grammar_done: bool = False  # the JSON is complete: finish with "stop"

    def banned(self) -> set[int]:
        """Tokens that would repeat an n-gram of the output (HF `no_repeat_ngram_size`, over generated tokens)."""
        n = self.params.no_repeat_ngram_size
        if not n or len(self.tokens) < n - 1:
            return set()
        return self.ngrams.get(tuple(self.tokens[len(self.tokens) - n + 1 :]), set())

    def record(self, token: int) -> None:
        p = self.params
        if not (p.no_repeat_ngram_size or p.repetition_guard):
            return
        self.tokens.append(token)
        t, n = len(self.tokens) - 1, p.no_repeat_ngram_size
        if n and t >= n - 1:
            self.ngrams.setdefault(tuple(self.tokens[t - n + 1 : t]), set()).add(token)
        if p.repetition_guard:
            self.repeating = self.repeating or self._loops(t)

    def _loops(self, t: int) -> bool:
        """Update the run of each period p <= max_period; the last run + p tokens repeat with period p."""
        p = self.params
        if not self.runs:
            self.runs = [0] * (p.repetition_max_period + 1)
        x = self.tokens
        for period in range(1, min(p.repetition_max_period, t) + 1):
            self.runs[period] = self.runs[period] + 1 if x[t] == x[t - period] else 0
            if self.runs[period] + period >= max(p.repetition_min_repeats * period, p.repetition_min_tokens):
                return True
        return False


class BatchSampler:
    """The engine's per-slot sampling tensors (preallocated) and the batched logits pipeline of one step.

    counts (S, V) float32: times each token was generated in the slot (only slots whose request has a penalty)
    prompt (S, V) bool: tokens of the slot's prompt (only slots with a repetition_penalty)
    bias (S, V) float32: the slot's logit_bias as a dense row (only slots with a logit_bias)
    """

    def __init__(self, slots: int, vocab: int, device: torch.device, tokenizer, eos_ids: tuple[int, ...]):
        self.vocab, self.device, self.tokenizer, self.eos_ids = vocab, device, tokenizer, tuple(eos_ids)
        self.counts = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self.prompt = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.bias = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self._bits = torch.arange(32, dtype=torch.int32)  # bit i of a mask word is token 32 * word + i
        self._grammar_tokenizer = None
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    # ---- per request ----
    def new_state(self, params: SamplingParams) -> SequenceState:
        state = SequenceState(params, make_generator(params, self.device))
        if params.json_schema is not None:
            llg = _llguidance()
            state.matcher = llg.LLMatcher(self.grammar_tokenizer(), json_grammar(params.json_schema), log_level=0)
            if state.matcher.is_error():
                raise ValueError(f"json_schema cannot be used: {state.matcher.get_error()}")
        return state

    def grammar_tokenizer(self):
        """llguidance's view of our tokenizer (built once; needs a fast, tokenizers-backed tokenizer)."""
        if self._grammar_tokenizer is None:
            import llguidance.hf

            try:
                self._grammar_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab, eos_token=list(self.eos_ids)
                )
            except ValueError as err:
                raise ValueError(f"json_schema is not available with this tokenizer: {err}") from None
        return self._grammar_tokenizer

    def admit(self, slot: int, state: SequenceState, prompt_ids: list[int]) -> None:
        """Reset the slot's rows for a new request (only the rows its parameters read)."""
        p = state.params
        if p.counts_tokens:
            self.counts[slot].zero_()
        if p.repetition_penalty != 1.0:
            self.prompt[slot].zero_()
            self.prompt[slot, torch.tensor(prompt_ids, device=self.device)] = True
        if p.logit_bias:
            ids, values = zip(*p.logit_bias, strict=True)
            self.bias[slot].zero_()
            self.bias[slot, torch.tensor(ids, device=self.device)] = torch.tensor(values, device=self.device)

    # ---- per step ----
    def sample(self, logits: torch.Tensor, slots: list[int], states: list[SequenceState]) -> list[int]:
        """logits (B, V) float32 of rows in `slots` -> one token per row; updates counts, n-grams, guard, grammar,
        logprobs."""
        x = self.process(logits, slots, states)
        tokens = sample_tokens(x, [s.params for s in states], [s.generator for s in states])
        self._logprobs(x, tokens, states)
        count_rows = [i for i, s in enumerate(states) if s.params.counts_tokens]
        if count_rows:
            rows = torch.tensor([slots[i] for i in count_rows], device=self.device)
            cols = torch.tensor([tokens[i] for i in count_rows], device=self.device)
            self.counts.index_put_((rows, cols), torch.ones(len(count_rows), device=self.device), accumulate=True)
        for s, tok in zip(states, tokens, strict=True):
            s.record(tok)
            if s.matcher is not None and not s.grammar_done:
                if not s.matcher.consume_token(tok):  # cannot happen for a token drawn under the mask
                    log.warning("grammar rejected token %d: %s", tok, s.matcher.get_error())
                s.grammar_done = s.matcher.is_stopped()
        return tokens

    def process(self, logits: torch.Tensor, slots: list[int], states: list[SequenceState]) -> torch.Tensor:
        """(B, V) raw logits -> processed logits (a new tensor; the same one when no row asks for anything)."""
        dev = self.device
        rep = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
        pen = [i for i, s in enumerate(states) if s.params.presence_penalty or s.params.frequency_penalty]
        biased = [i for i, s in enumerate(states) if s.params.logit_bias]
        bans = [(i, s.banned()) for i, s in enumerate(states) if s.params.no_repeat_ngram_size]
        bans = [(i, b) for i, b in bans if b]
        masked = [i for i, s in enumerate(states) if s.matcher is not None and not s.grammar_done]
        if not (rep or pen or biased or bans or masked):
            return logits
        x = logits.clone()
        if rep:
            r, sl = torch.tensor(rep, device=dev), torch.tensor([slots[i] for i in rep], device=dev)
            p = torch.tensor([states[i].params.repetition_penalty for i in rep], device=dev)[:, None]  # (R, 1)
            seen = self.prompt[sl] | (self.counts[sl] > 0)  # (R, V)
            y = x[r]
            x[r] = torch.where(seen, torch.where(y > 0, y / p, y * p), y)
        if pen:
            r, sl = torch.tensor(pen, device=dev), torch.tensor([slots[i] for i in pen], device=dev)
            freq = torch.tensor([states[i].params.frequency_penalty for i in pen], device=dev)[:, None]
            pres = torch.tensor([states[i].params.presence_penalty for i in pen], device=dev)[:, None]
            c = self.counts[sl]  # (R, V)
            x[r] -= freq * c + pres * (c > 0)
        if biased:
            r, sl = torch.tensor(biased, device=dev), torch.tensor([slots[i] for i in biased], device=dev)
            x[r] += self.bias[sl]
        if masked:  # before the n-gram bans, so that a ban cannot leave the grammar without a token
            r = torch.tensor(masked, device=dev)
            allowed = self._grammar_mask([states[i].matcher for i in masked])  # (R, V) bool
            x[r] = x[r].masked_fill(~allowed, float("-inf"))
        if bans:
            both = [i for i, _ in bans if i in masked]
            kept = x[torch.tensor(both, device=dev)] if both else None  # (R2, V) grammar-masked rows, before bans
            rows = [i for i, b in bans for _ in b]
            cols = [t for _, b in bans for t in b]
            x[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = float("-inf")
            if both:  # a grammar row the bans left without any token: the grammar wins
                r2 = torch.tensor(both, device=dev)
                dead = x[r2].amax(-1) == float("-inf")  # (R2,)
                if bool(dead.any()):
                    x[r2[dead]] = kept[dead]
        return x

    def _grammar_mask(self, matchers: list) -> torch.Tensor:
        """Allowed next tokens of each matcher -> (R, V) bool on the device (computed on the host by llguidance)."""
        words = torch.stack([torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32) for m in matchers])
        bits = (words[:, :, None] >> self._bits) & 1  # (R, W, 32): bit i of word w is token 32 * w + i
        return bits.reshape(len(matchers), -1)[:, : self.vocab].bool().to(self.device)

    def _logprobs(self, x: torch.Tensor, tokens: list[int], states: list[SequenceState]) -> None:
        rows = [i for i, s in enumerate(states) if s.params.logprobs]
        if not rows:
            return
        r = torch.tensor(rows, device=self.device)
        lp = x[r].log_softmax(-1)  # (R, V)
        chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=self.device)[:, None])[:, 0].tolist()
        k = max(states[i].params.top_logprobs for i in rows)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(rows):
            s = states[i]
            alts = [
                TopLogprob(t, *self.piece(t), v)
                for t, v in zip(top_i[j][: s.params.top_logprobs], top_v[j][: s.params.top_logprobs], strict=True)
                if v != float("-inf")
            ]
            s.logprobs.append(TokenLogprob(tokens[i], *self.piece(tokens[i]), chosen[j], alts))

    def piece(self, token: int) -> tuple[str, list[int]]:
        """Token id -> (text, UTF-8 bytes) of its piece (Llama sentencepiece convention: "▁" is a space)."""
        if token not in self._pieces:
            name = self.tokenizer.convert_ids_to_tokens(token)
            if name is None:
                text, raw = "", b""
            elif len(name) == 6 and name.startswith("<0x") and name.endswith(">"):
                raw = bytes([int(name[3:5], 16)])
                text = raw.decode("utf-8") if raw[0] < 0x80 else f"\\x{raw[0]:02x}"
            else:
                text = name.replace("\u2581", " ")
                raw = text.encode("utf-8")
            self._pieces[token] = (text, list(raw))
        return self._pieces[token]
