"""Sampling features: penalties, logit bias, n-gram bans, logprobs, the repetition guard, JSON-schema output, `n`.

Penalties and bans are checked against Hugging Face's own logits processors and independent formulas; engine-level
tests run the tiny RANDOM checkpoint, rigged with logit_bias where a behaviour must be forced.
"""

from __future__ import annotations

import asyncio
import collections
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.engine import Engine, EngineConfig, EngineObserver
from model.sampling import GREEDY_BELOW, JSON_OBJECT, BatchSampler, SamplingParams, SequenceState, sample_tokens

from .model_helpers import PAGES, QUESTIONS

V = 512  # the tiny checkpoint's vocabulary


@pytest.fixture(scope="module")
def engine(model, processor):
    return Engine(model, processor, EngineConfig(max_slots=4, max_seq_len=400))


def run(engine, question="Transcribe this page.", images=(), **kw) -> object:
    kw.setdefault("max_new_tokens", 24)
    kw.setdefault("stop_token_ids", ())
    return engine.generate([engine.make_request(question, list(images), SamplingParams(**kw))])[0]


# ---- parameters ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": {5: 101}}, r"logit_bias\[5\]"),
        ({"logit_bias": {-1: 1}}, "token ids"),
        ({"logit_bias": {"x": 1}}, "token ids"),
        ({"logit_bias": {"5": 1, 5: 2}}, "twice"),
        ({"logit_bias": [1, 2]}, "entry"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 2.0}, "no_repeat_ngram_size"),
        ({"logprobs": 1}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "needs logprobs"),
        ({"repetition_guard": "yes"}, "repetition_guard"),
        ({"repetition_max_period": 0}, "repetition_max_period"),
        ({"repetition_min_repeats": 1}, "repetition_min_repeats"),
        ({"repetition_min_tokens": 1}, "repetition_min_tokens"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": "[1, 2]"}, "must be a JSON object"),
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "cannot be compiled"),
    ],
)
def test_bad_parameters_are_refused_with_their_name(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_parameters_normalise_to_hashable_values():
    p = SamplingParams(logit_bias={"7": 1.5, 3: -100}, json_schema={"type": "object", "properties": {"b": {}, "a": {}}})
    assert p.logit_bias == ((3, -100.0), (7, 1.5))
    assert list(json.loads(p.json_schema)["properties"]) == ["b", "a"], "property order is the output order"
    hash(p)
    assert not SamplingParams().counts_tokens and SamplingParams(presence_penalty=0.1).counts_tokens


def test_engine_refuses_bias_outside_the_vocabulary(engine):
    req = engine.make_request("x", [], SamplingParams(logit_bias={V: 5}))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.validate(req)


# ---- the batched pipeline against references -----------------------------------------------------------------------
def make_sampler(processor, slots=4) -> BatchSampler:
    return BatchSampler(slots, V, torch.device("cpu"), processor.tokenizer, tuple(processor.stop_token_ids))


def feed(sampler: BatchSampler, slot: int, state: SequenceState, prompt: list[int], generated: list[int]) -> None:
    """Put a request with this prompt and these generated tokens into `slot` as the engine would."""
    sampler.admit(slot, state, prompt)
    for tok in generated:
        if state.params.no_repeat_ngram_size:  # a ban would refuse the repeats this history is made of
            state.record(tok)
            continue
        logits = torch.full((1, V), -1e4)
        logits[0, tok] = 0.0  # greedy picks `tok` whatever the penalties (they change logits by far less)
        assert sampler.sample(logits, [slot], [state]) == [tok], "feeding a token must reproduce it"


def test_penalties_match_hugging_face_and_openai_formulas(processor):
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (12,), generator=g).tolist()
    generated = torch.randint(0, 40, (30,), generator=g).tolist()  # small id range: many repeats
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4),
        SamplingParams(logit_bias={3: 2.5, 9: -100}),
        SamplingParams(no_repeat_ngram_size=2),
        SamplingParams(),
    ]
    sampler = make_sampler(processor, slots=len(params))
    states = [SequenceState(p) for p in params]
    for slot, state in enumerate(states):
        feed(sampler, slot, state, prompt, generated)
    raw = torch.randn(len(params), V, generator=g) * 3
    out = sampler.process(raw, list(range(len(params))), states)

    hf_rep = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + generated]), raw[0:1].clone())
    torch.testing.assert_close(out[0], hf_rep[0])
    counts = torch.bincount(torch.tensor(generated), minlength=V).float()
    torch.testing.assert_close(out[1], raw[1] - (-0.4) * counts - 0.7 * (counts > 0))
    expect = raw[2].clone()
    expect[3] += 2.5
    expect[9] -= 100
    torch.testing.assert_close(out[2], expect)
    hf_ngram = NoRepeatNGramLogitsProcessor(2)(torch.tensor([generated]), raw[3:4].clone())  # generated ids only
    assert torch.equal(torch.isinf(out[3]), torch.isinf(hf_ngram[0])) and torch.isinf(out[3]).any()
    assert torch.equal(out[4], raw[4])


def test_rows_without_processing_cost_nothing(processor):
    sampler = make_sampler(processor)
    states = [SequenceState(SamplingParams(temperature=0.8, top_k=5)), SequenceState(SamplingParams())]
    logits = torch.randn(2, V)
    assert sampler.process(logits, [0, 1], states) is logits, "default rows must pass the logits through untouched"


def test_admit_resets_a_reused_slot(processor):
    sampler = make_sampler(processor, slots=1)
    first = SequenceState(SamplingParams(frequency_penalty=1.0, logit_bias={4: 3.0}))
    feed(sampler, 0, first, [1, 2], [5, 5, 6])
    second = SequenceState(SamplingParams(frequency_penalty=1.0))
    sampler.admit(0, second, [1, 2])
    raw = torch.randn(1, V)
    torch.testing.assert_close(sampler.process(raw, [0], [second]), raw)  # no counts, no bias left from `first`


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    vocab=st.integers(2, 6),
    steps=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_no_repeat_ngram_never_repeats_an_ngram(processor, n, vocab, steps, seed):
    """Greedy over random logits on a few tokens (so repeats would be everywhere) never repeats an n-gram."""
    sampler = make_sampler(processor, slots=1)
    state = SequenceState(SamplingParams(no_repeat_ngram_size=n))
    sampler.admit(0, state, [1])
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(steps):
        logits = torch.full((1, V), -1e4)
        logits[0, :vocab] = torch.randn(vocab, generator=g)
        x = sampler.process(logits, [0], [state])
        if torch.isinf(x[0, :vocab]).all():  # every token would repeat an n-gram: nothing left to generate
            break
        out += sampler.sample(logits, [0], [state])
    grams = [tuple(out[i : i + n]) for i in range(len(out) - n + 1)]
    assert len(grams) == len(set(grams)), f"an {n}-gram repeats in {out}"


@settings(max_examples=80, deadline=None)
@given(
    temperature=st.floats(0.0, 1e-3),
    top_k=st.integers(0, 8),
    top_p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_temperature_near_zero_never_fails_and_below_the_line_is_greedy(temperature, top_k, top_p, seed):
    """Logits far apart against a temperature near 0 (denormals included): never an error (dividing float32 logits by
    such a temperature gave inf - inf = nan in the softmax and failed the engine step); below GREEDY_BELOW the draw
    is the argmax, above it a token that was not banned."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, V, generator=g) * 30
    logits[:, logits[1].argmax()] = float("-inf")  # a banned token, as logit_bias and n-gram bans leave them
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)] * 3
    gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
    tokens = sample_tokens(logits.clone(), params, gens)
    assert all(torch.isfinite(logits[row, t]) for row, t in enumerate(tokens))
    if temperature < GREEDY_BELOW:
        assert tokens == logits.argmax(-1).tolist()


# ---- engine behaviour on the tiny random checkpoint ---------------------------------------------------------------
def test_a_tiny_temperature_answers_like_greedy(engine):
    plain = run(engine)
    tiny = run(engine, temperature=4.8e-114, seed=1)
    assert tiny.finish_reason == plain.finish_reason and tiny.token_ids == plain.token_ids


def test_logit_bias_forces_and_bans(engine):
    plain = run(engine)
    forced = run(engine, logit_bias={42: 100})
    assert forced.token_ids == [42] * 24
    sampled = run(engine, logit_bias={42: 100}, temperature=1.0, seed=3)
    assert sampled.token_ids == [42] * 24
    banned = collections.Counter(plain.token_ids).most_common(1)[0][0]
    without = run(engine, logit_bias={banned: -100})
    assert banned not in without.token_ids and without.token_ids != plain.token_ids


def test_penalties_reduce_repeats(engine):
    """The random model loops (greedy); each penalty breaks the loop into more distinct tokens."""
    plain = run(engine, max_new_tokens=40)
    repeats = 40 - len(set(plain.token_ids))
    assert repeats >= 10, "the rigged setting needs a looping baseline"
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.5}):
        res = run(engine, max_new_tokens=40, **kw)
        assert 40 - len(set(res.token_ids)) < repeats / 2, kw
    ngram = run(engine, max_new_tokens=40, no_repeat_ngram_size=2)
    pairs = list(zip(ngram.token_ids, ngram.token_ids[1:], strict=False))
    assert len(pairs) == len(set(pairs)) and len(set(zip(plain.token_ids, plain.token_ids[1:], strict=False))) < 39


def test_logprobs_are_log_softmax_of_the_processed_logits(engine, model):
    bias = {447: -3.0, 300: 4.0}
    res = run(engine, max_new_tokens=6, logprobs=True, top_logprobs=5, logit_bias=bias)
    assert len(res.logprobs) == res.completion_tokens == 6
    prompt = engine.make_request("Transcribe this page.", []).prompt_ids
    with torch.no_grad():  # independent: a full forward without caches over prompt + output
        logits = model(torch.tensor([prompt + res.token_ids]), None, None)[0].float()  # (T, V)
    logits[:, list(bias)] += torch.tensor(list(bias.values()))
    expect = logits[len(prompt) - 1 : -1].log_softmax(-1)  # (6, V): the distribution each token was drawn from
    for step, lp in enumerate(res.logprobs):
        assert lp.token_id == res.token_ids[step]
        assert lp.logprob == pytest.approx(expect[step, lp.token_id].item(), abs=1e-4)
        tops = [t.logprob for t in lp.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert [t.token_id for t in lp.top_logprobs] == expect[step].topk(5).indices.tolist()
        assert lp.top_logprobs[0].token_id == lp.token_id, "greedy picks the most likely token"
        assert lp.token == engine.sampler.piece(lp.token_id)[0] and bytes(lp.bytes).decode("utf-8", "replace")
    assert "".join(lp.token for lp in res.logprobs).strip() == res.text.strip()


def test_logprobs_alone_change_no_ids(engine):
    a = run(engine, images=[PAGES[0]], max_new_tokens=12, temperature=0.9, seed=5)
    b = run(engine, images=[PAGES[0]], max_new_tokens=12, temperature=0.9, seed=5, logprobs=True, top_logprobs=2)
    assert a.token_ids == b.token_ids and a.logprobs is None and len(b.logprobs) == 12


def test_repetition_guard_ends_a_forced_loop(engine):
    # +100 on two tokens: the model can only pick between them, and greedy settles into a cycle
    kw = dict(max_new_tokens=120, logit_bias={42: 100, 43: 100})
    loop = run(engine, **kw)
    assert loop.finish_reason == "length" and set(loop.token_ids) <= {42, 43}
    guarded = run(engine, **kw, repetition_guard=True, repetition_min_tokens=16, repetition_min_repeats=4)
    assert guarded.finish_reason == "repetition"
    assert guarded.token_ids == loop.token_ids[: guarded.completion_tokens], "the guard only ends the sequence"
    assert 16 <= guarded.completion_tokens < 60
    tail = guarded.token_ids[-16:]
    assert any(all(tail[i] == tail[i - p] for i in range(p, 16)) for p in (1, 2, 3, 4)), "ended on a periodic tail"


SMALL = {"repetition_min_tokens": 8, "repetition_min_repeats": 4}
NEAR_LOOP = [t for i in range(40) for t in (1, 2, 3, 4, 5, 100 + i)]  # a cycle whose last token always differs


@pytest.mark.parametrize(
    "settings,seq,found_at",
    [
        (SMALL, [7] * 10, 8),  # period 1: 8 tokens (min_tokens) -> flagged at the 8th
        (SMALL, [1, 2] * 6, 8),  # period 2: four repeats = 8 tokens
        (SMALL, [1, 2, 3] * 4, 12),  # period 3: four repeats = 12 tokens
        (SMALL, [5, 1, 2, 3] * 3 + [9], None),  # period 4 only three times
        (SMALL, list(range(30)), None),
        ({}, [1, 2, 3, 4, 5, 6] * 40, 64),  # defaults: a 6-token cycle is flagged once it spans 64 tokens
        ({}, [9] * 63, None),
        ({}, list(range(20)) * 5, 80),  # a 20-token cycle: four repeats
        ({}, NEAR_LOOP, None),
        ({"repetition_max_period": 5}, list(range(6)) * 40, None),  # the cycle is longer than looked for
    ],
)
def test_repetition_guard_thresholds(settings, seq, found_at):
    state = SequenceState(SamplingParams(repetition_guard=True, **settings))
    flagged = None
    for i, tok in enumerate(seq, start=1):
        state.record(tok)
        if state.repeating and flagged is None:
            flagged = i
    assert flagged == found_at


MIXED = [
    {},
    {"frequency_penalty": 1.2, "presence_penalty": 0.3},
    {"repetition_penalty": 1.3, "logprobs": True, "top_logprobs": 3},
    {"logit_bias": {42: 6.0, 300: -50}, "temperature": 1.1, "seed": 4},
    {"no_repeat_ngram_size": 3, "temperature": 0.8, "top_p": 0.9, "seed": 2, "logprobs": True},
    {"repetition_guard": True, "repetition_min_tokens": 6, "logit_bias": {42: 100}},
    {
        "json_schema": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        }
    },
]


def test_mixed_settings_in_one_batch_equal_each_alone(model, processor):
    def requests(engine):
        return [
            engine.make_request(
                QUESTIONS[i % 3], [PAGES[i % 3]] if i % 2 else [], SamplingParams(max_new_tokens=14, **kw)
            )
            for i, kw in enumerate(MIXED)
        ]

    batched = Engine(model, processor, EngineConfig(max_slots=4, max_seq_len=400))
    together = batched.generate(requests(batched))  # 7 requests over 4 slots: slots are reused mid-run
    alone = Engine(model, processor, EngineConfig(max_slots=1, max_seq_len=400))
    for req, res in zip(requests(alone), together, strict=True):
        single = alone.generate([req])[0]
        assert res.token_ids == single.token_ids and res.finish_reason == single.finish_reason
        if req.sampling.logprobs:
            got = [lp.logprob for lp in res.logprobs]
            assert got == pytest.approx([lp.logprob for lp in single.logprobs], abs=1e-5)
    assert together[5].finish_reason == "repetition"
    assert json.loads(together[6].text)["ok"] in (True, False)


def test_stream_carries_every_token_and_its_logprobs(engine):
    # a long stop string that never comes holds text back, so some tokens reach the stream in a later delta
    sampling = SamplingParams(max_new_tokens=16, logprobs=True, top_logprobs=2, stop_token_ids=(), stop=("Q" * 12,))

    async def collect():
        req = engine.make_request(QUESTIONS[0], [PAGES[1]], sampling)
        return [d async for d in engine.stream(req)]

    try:
        deltas = asyncio.run(collect())
    finally:
        engine.shutdown()
    result = deltas[-1].result
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert [lp for d in deltas for lp in d.logprobs] == result.logprobs
    assert "".join(d.text for d in deltas) == result.text
    assert any(len(d.token_ids) > 1 for d in deltas), "the held-back case was not exercised"


# ---- JSON output ----------------------------------------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "pages": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["invoice", "letter", "table"]},
        "signed": {"type": "boolean"},
    },
    "required": ["title", "pages", "kind", "signed"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1), (1.0, 2), (0.7, 3)])
def test_json_schema_output_parses_and_fits(engine, temperature, seed):
    res = run(engine, images=[PAGES[0]], max_new_tokens=120, temperature=temperature, seed=seed, json_schema=SCHEMA)
    assert res.finish_reason == "stop", "the schema bounds every value, so the grammar ends the answer"
    doc = json.loads(res.text)
    assert set(doc) == set(SCHEMA["required"]) and len(doc["title"]) <= 12
    assert (
        0 <= doc["pages"] <= 999 and doc["kind"] in ("invoice", "letter", "table") and isinstance(doc["signed"], bool)
    )


def test_json_object_output_parses_when_it_ends(engine):
    """Free JSON has unbounded strings, so random weights may run out of tokens; every answer that ends is an object."""
    ended = 0
    for seed in range(6):
        res = run(engine, max_new_tokens=80, temperature=1.0, seed=seed, json_schema=JSON_OBJECT)
        assert res.text.startswith("{")
        if res.finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(res.text), dict)
    assert ended >= 2, "the grammar should end some of these answers"


# ---- n choices ------------------------------------------------------------------------------------------------------
class CountingViews(EngineObserver):
    def __init__(self):
        self.views = 0

    def on_encode(self, views, seconds):
        self.views += views


@pytest.mark.parametrize("slots", [1, 4])
def test_fork_shares_one_encoding_and_samples_distinct_choices(model, processor, slots):
    obs = CountingViews()
    engine = Engine(model, processor, EngineConfig(max_slots=slots, max_seq_len=400), observer=obs)
    base = engine.make_request(QUESTIONS[0], [PAGES[0]], SamplingParams(max_new_tokens=10, temperature=1.0, seed=11))
    choices = engine.fork(base, 4)
    assert [c.request_id for c in choices] == [f"{base.request_id}-{i}" for i in range(4)]
    results = engine.generate(choices)
    assert obs.views == base.images[0].n_views, "the page was encoded more than once"
    assert sum(r.cached_images for r in results) == 3
    assert len({tuple(r.token_ids) for r in results}) > 1, "distinct seeds should give distinct choices"
    alone = engine.generate([engine.make_request(QUESTIONS[0], [PAGES[0]], base.sampling)])[0]
    assert results[0].token_ids == alone.token_ids, "choice 0 is the n=1 answer"
    with pytest.raises(ValueError, match="n must be"):
        engine.fork(base, 0)


def test_grammar_wins_over_ngram_bans_and_banned_tokens_are_no_alternatives(engine):
    # the only valid answer repeats tokens (two quotes at least), which no_repeat_ngram_size=1 alone would forbid
    res = run(
        engine,
        max_new_tokens=40,
        json_schema={"enum": ["total total total"]},
        no_repeat_ngram_size=1,
        logprobs=True,
        top_logprobs=20,
    )
    assert res.finish_reason == "stop" and json.loads(res.text) == "total total total"
    for lp in res.logprobs:
        assert lp.top_logprobs and all(t.logprob > float("-inf") for t in lp.top_logprobs)
    assert any(len(lp.top_logprobs) < 20 for lp in res.logprobs), "the mask should leave fewer than 20 tokens"
