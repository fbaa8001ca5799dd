"""The generation engine: equivalence with single-request generate under any mix/order/slot count, sampling
reproducibility, feature-cache reuse, stop conditions, streaming and incremental detokenization."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from model import ChatMessage, Processor
from model.engine import Engine, EngineConfig, EngineObserver, Request
from model.sampling import IncrementalDetokenizer, SamplingParams, byte_token_ids
from model.windows import normalize_views

from .model_helpers import PAGES, QUESTIONS, Finishes, page, record_logits


def reference(model, processor, req: Request) -> list[int]:
    """Single-request `InfiMMHD.generate` (greedy) for an engine request."""
    media = None
    if req.images:
        with torch.no_grad():
            items = [
                model.build_media(model.encode_views(normalize_views(p.views)), p.rows, p.cols) for p in req.images
            ]
        # generate takes equal-sized items; these tests give each request at most one page
        media = torch.stack(items)[None]
    stop = list(req.sampling.stop_token_ids) if req.sampling.stop_token_ids is not None else processor.stop_token_ids
    out = model.generate(torch.tensor([req.prompt_ids]), None, media, req.sampling.max_new_tokens, stop)[0].tolist()
    return out


def mixed_requests(engine, n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        sampling = SamplingParams(max_new_tokens=rng.choice([3, 6, 9]), stop_token_ids=rng.choice([None, (), (17, 40)]))
        if i % 4 == 3:  # text only
            reqs.append(engine.make_chat_request([ChatMessage("user", [rng.choice(QUESTIONS)])], sampling))
        else:
            reqs.append(engine.make_request(rng.choice(QUESTIONS), [rng.choice(PAGES)], sampling))
    return reqs


@pytest.mark.parametrize("slots,order_seed", [(1, 0), (2, 1), (5, 2), (8, 3)])
def test_greedy_outputs_equal_single_request_generate(model, processor, slots, order_seed):
    # vit_batch_views=5 for one case: pages then straddle ViT chunks
    engine = Engine(
        model,
        processor,
        EngineConfig(max_slots=slots, max_seq_len=160, max_prefill_batch=3, vit_batch_views=5 if slots == 2 else 32),
    )
    reqs = mixed_requests(engine, 10, seed=order_seed)
    expected = {r.request_id: reference(model, processor, r) for r in reqs}
    random.Random(order_seed).shuffle(reqs)
    results = engine.generate(reqs)
    for req, res in zip(reqs, results, strict=True):
        ids = expected[req.request_id]
        stop = set(req.sampling.stop_token_ids if req.sampling.stop_token_ids is not None else processor.stop_token_ids)
        if any(t in stop for t in ids):  # generate pads after a stop; the engine ends the sequence there
            ids = ids[: next(i for i, t in enumerate(ids) if t in stop) + 1]
        assert res.token_ids == ids
        assert res.finish_reason == ("stop" if ids[-1] in stop else "length")
        assert res.completion_tokens == len(ids) and res.prompt_tokens == len(req.prompt_ids)
        assert res.text == processor.decode(ids)


def test_results_do_not_depend_on_batch_neighbours(model, processor):
    engine = Engine(model, processor, EngineConfig(max_slots=6, max_seq_len=160))
    target = engine.make_request(QUESTIONS[0], [PAGES[0]], SamplingParams(max_new_tokens=8))
    alone = engine.generate([target])[0].token_ids
    crowd = mixed_requests(engine, 7, seed=9)
    twin = engine.make_request(QUESTIONS[0], [PAGES[0]], SamplingParams(max_new_tokens=8))
    results = engine.generate(crowd[:3] + [twin] + crowd[3:])
    assert results[3].token_ids == alone


def test_sampling_is_reproducible_per_seed(model, processor):
    engine = Engine(model, processor, EngineConfig(max_slots=4, max_seq_len=160))

    def sampled(seed, crowd=0):
        req = engine.make_request(
            QUESTIONS[1],
            [PAGES[1]],
            SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=seed),
        )
        others = mixed_requests(engine, crowd, seed=seed + 100)
        return engine.generate([req] + others)[0].token_ids

    a = sampled(7)
    assert sampled(7, crowd=3) == a  # same seed, different batch neighbours -> same tokens
    assert any(sampled(s) != a for s in (8, 9, 10))  # another seed changes something
    greedy = engine.generate([engine.make_request(QUESTIONS[1], [PAGES[1]], SamplingParams(max_new_tokens=12))])[0]
    top1 = engine.make_request(
        QUESTIONS[1], [PAGES[1]], SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1, seed=1)
    )
    assert engine.generate([top1])[0].token_ids == greedy.token_ids  # top-k 1 is greedy


class Counting(EngineObserver):
    def __init__(self):
        self.views = 0
        self.encodes = 0

    def on_encode(self, views, seconds):
        self.views += views
        self.encodes += 1


def test_one_encode_for_many_questions_on_one_page(model, processor):
    obs = Counting()
    engine = Engine(model, processor, EngineConfig(max_slots=2, max_seq_len=160), observer=obs)
    reqs = [engine.make_request(q, [PAGES[0]], SamplingParams(max_new_tokens=5)) for q in QUESTIONS * 2]
    n_views = reqs[0].images[0].n_views
    results = engine.generate(reqs)  # 6 requests through 2 slots: admitted over several steps
    assert obs.views == n_views, "the page was encoded more than once"
    assert sum(r.cached_images for r in results) == len(reqs) - 1
    cold = Engine(model, processor, EngineConfig(max_slots=2, max_seq_len=160, feature_cache_mb=0))
    fresh = [cold.make_request(q, [PAGES[0]], SamplingParams(max_new_tokens=5)) for q in QUESTIONS * 2]
    assert [r.token_ids for r in cold.generate(fresh)] == [r.token_ids for r in results]


@pytest.mark.parametrize("interleave", [True, False])
def test_feature_cache_counts_hits_misses_evictions_and_bytes(model, processor, interleave):
    """A 2 MB cache holds page A or page B, not both: A, A, B, A gives a hit, three misses and two evictions, seen
    alike in `stats()` (what /ready shows) and in the Prometheus counters the observer feeds."""
    import prometheus_client

    from runtime.metrics import Metrics

    registry = prometheus_client.CollectorRegistry()
    config = EngineConfig(max_slots=1, max_seq_len=160, feature_cache_mb=2, interleave_vit=interleave)
    engine = Engine(model, processor, config, observer=Metrics("batch", "prometheus", registry).engine_observer())
    a, b = PAGES[1], PAGES[0]

    def ask(png: bytes) -> Request:
        req = engine.make_request("Read it.", [png], SamplingParams(max_new_tokens=2))
        engine.generate([req])
        return req

    def nbytes(req: Request) -> int:  # (V*N, Dv) media of the page in the engine's dtype
        vision = model.config.vision
        return req.images[0].n_views * vision.tokens * model.config.vis_dim * engine.dtype.itemsize

    def metric(name: str) -> float:
        return registry.get_sample_value(name, {"frontend": "batch"}) or 0.0

    size_a, size_b = nbytes(ask(a)), nbytes(ask(a))
    assert max(size_a, size_b) <= 2 * 2**20 < size_a + nbytes(ask(b)), "the test needs pages that fit only alone"
    ask(a)
    s = engine.stats()
    counts = (s["feature_cache_hits"], s["feature_cache_misses"], s["feature_cache_evictions"])
    assert counts == (1, 3, 2) and s["feature_cache_bytes"] == size_a and s["feature_cache_items"] == 1, s
    exported = [metric(f"infimm_feature_cache_{n}_total") for n in ("hits", "misses", "evictions")]
    assert exported == [1, 3, 2] and metric("infimm_feature_cache_bytes") == size_a


def test_vit_batches_pages_together_in_chunks(model, processor):
    obs = Counting()
    engine = Engine(model, processor, EngineConfig(max_slots=3, max_seq_len=160, vit_batch_views=4), observer=obs)
    reqs = [engine.make_request("Read it.", [p], SamplingParams(max_new_tokens=2)) for p in PAGES]
    engine.generate(reqs)
    assert obs.encodes == 1  # three pages admitted together -> one encode call over all their views
    assert obs.views == sum(r.images[0].n_views for r in reqs)


def test_stop_strings_cut_the_text(model, processor):
    engine = Engine(model, processor, EngineConfig(max_slots=1, max_seq_len=160))
    full = engine.generate([engine.make_request(QUESTIONS[0], [PAGES[0]], SamplingParams(max_new_tokens=20))])[0]
    assert len(full.text) > 4, "need some text to cut"
    stop = full.text[2:4]
    cut = engine.generate(
        [engine.make_request(QUESTIONS[0], [PAGES[0]], SamplingParams(max_new_tokens=20, stop=(stop,)))]
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_invalid_requests_fail_before_any_work(model, processor):
    engine = Engine(model, processor, EngineConfig(max_slots=1, max_seq_len=64))
    with pytest.raises(ValueError, match="context"):
        engine.generate([engine.make_request("x " * 80, [], SamplingParams(max_new_tokens=4))])
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="<image>"):
        engine.generate(
            [Request(prompt_ids=[1, model.config.image_token_id, 5], sampling=SamplingParams(max_new_tokens=4))]
        )
    assert engine.stats()["waiting"] == 0 and engine.stats()["active"] == 0


def test_streaming_deltas_concatenate_to_the_text(model, processor):
    engine = Engine(model, processor, EngineConfig(max_slots=4, max_seq_len=160))

    async def run():
        reqs = [
            engine.make_request(q, [PAGES[i % 3]], SamplingParams(max_new_tokens=10)) for i, q in enumerate(QUESTIONS)
        ]

        async def collect(r):
            parts, final = [], None
            async for d in engine.stream(r):
                parts.append(d.text)
                final = d.result or final
            return "".join(parts), final

        return reqs, await asyncio.gather(*(collect(r) for r in reqs))

    try:
        reqs, outs = asyncio.run(run())
    finally:
        engine.shutdown()
    sync = Engine(model, processor, EngineConfig(max_slots=1, max_seq_len=160))
    for req, (text, result) in zip(reqs, outs, strict=True):
        assert result is not None and text == result.text
        again = sync.generate(
            [sync.make_request(*_question_and_page(req, processor), SamplingParams(max_new_tokens=10))]
        )
        assert again[0].text == text
        t = result.timings
        assert 0 <= t.queue_s <= t.ttft_s <= t.total_s and t.prefill_s > 0


def _question_and_page(req, processor):
    text = processor.decode(req.prompt_ids)
    question = text.split("USER:")[-1].split("ASSISTANT:")[0].strip()
    return question, [req.images[0]]


def test_cancelled_stream_is_aborted_and_frees_its_slot(model, processor):
    finishes = Finishes()
    engine = Engine(model, processor, EngineConfig(max_slots=1, max_seq_len=300), observer=finishes)

    async def run():
        req = engine.make_request(QUESTIONS[0], [PAGES[0]], SamplingParams(max_new_tokens=150, stop_token_ids=()))
        agen = engine.stream(req)
        await agen.__anext__()
        await agen.aclose()  # client went away
        follow = engine.make_request(QUESTIONS[1], [PAGES[1]], SamplingParams(max_new_tokens=3))
        return req, await asyncio.wait_for(engine.complete(follow), timeout=60)

    try:
        req, result = asyncio.run(run())
    finally:
        engine.shutdown()
    cancelled = finishes.results[req.request_id]  # the follow-up ran after it in the only slot, so it has finished
    assert cancelled.finish_reason == "abort", f"the cancelled stream finished as {cancelled.finish_reason!r}"
    assert cancelled.completion_tokens < 150, "the cancelled stream ran to its token limit"
    assert result.finish_reason in ("stop", "length"), result.finish_reason
    assert engine.stats()["active"] == 0, engine.stats()


def test_incremental_detokenizer_matches_full_decode(processor):
    tok = processor.tokenizer
    text = "Total: 200,40 € — café naïve 中文 ✓ end."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids), "want byte-fallback pieces in the test"
    byte_ids = byte_token_ids(tok)
    assert len(byte_ids) == 256
    rng = random.Random(0)
    for trial in range(300):  # random ids: runs of byte tokens that are not valid UTF-8 included
        seq = ids if trial == 0 else [rng.randrange(3, len(tok)) for _ in range(rng.randrange(1, 40))]
        d = IncrementalDetokenizer(tok, byte_ids=byte_ids)
        streamed = "".join(d.push(t) for t in seq) + d.finish()
        assert streamed == tok.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_detokenizer_holds_back_stop_strings(processor):
    tok = processor.tokenizer
    ids = tok("The invoice total is 200 and the date", add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, stop=("total is",))
    deltas = [d.push(t) for t in ids]
    deltas.append(d.finish())
    assert "".join(deltas) == "The invoice " and d.stopped_at is not None
    assert all("total" not in x for x in deltas)


def test_a_failing_step_leaves_the_engine_usable(model, processor, monkeypatch):
    engine = Engine(model, processor, EngineConfig(max_slots=2, max_seq_len=160))
    reqs = [engine.make_request(q, [PAGES[1]], SamplingParams(max_new_tokens=4)) for q in QUESTIONS]
    calls = {"n": 0}
    real = engine._decode

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device error")
        real()

    monkeypatch.setattr(engine, "_decode", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.generate(reqs)
    assert engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0
    monkeypatch.setattr(engine, "_decode", real)
    again = engine.generate([engine.make_request(QUESTIONS[0], [PAGES[1]], SamplingParams(max_new_tokens=4))])
    assert again[0].completion_tokens == 4


def test_slot_media_capacity_follows_the_window_cap(model, tiny_checkpoint):
    from model.windows import WindowConfig

    proc = Processor.from_pretrained(tiny_checkpoint, windows=WindowConfig(max_windows=20))
    engine = Engine(model, proc, EngineConfig(max_slots=1, max_seq_len=160))
    assert engine.config.max_views == 21
    big = page(2800, 1400, "wide")  # 3 x 6 = 18 windows under a cap of 20
    res = engine.generate([engine.make_request("Read.", [big], SamplingParams(max_new_tokens=2))])
    assert res[0].completion_tokens == 2


# ---- hot-path switches: each one on or off gives the same tokens -----------------------------------------------------
ALL_OFF = dict(
    interleave_vit=False,
    dense_attention=False,
    precompute=False,
    fused_norm=False,
    vocab_pad=0,
    late_copy=False,
    kv_bucket=128,
    max_prefill_batch=8,
    packed_prefill=False,
    decode_attention="bucket",
)
SWITCHES = {  # one switch on at a time over ALL_OFF, then all of them (compile: see tests/test_benchmarks.py)
    "interleave_vit": dict(interleave_vit=True, vit_step_views=6),
    "dense_attention": dict(dense_attention=True),
    "precompute": dict(precompute=True),
    "fused_norm": dict(fused_norm=True),
    "vocab_pad": dict(vocab_pad=96),  # the tiny vocabulary (512) is a multiple of 64 and 128: force padding
    "late_copy": dict(late_copy=True),
    "kv_bucket": dict(kv_bucket=16),
    "prefill_batch": dict(max_prefill_batch=32),
    "packed_prefill": dict(packed_prefill=True),
    "own_length": dict(decode_attention="own_length"),
    "all": dict(
        interleave_vit=True,
        vit_step_views=6,
        dense_attention=True,
        precompute=True,
        fused_norm=True,
        vocab_pad=96,
        late_copy=True,
        kv_bucket=16,
        packed_prefill=True,
        decode_attention="own_length",
    ),
}


def request_sets(engine) -> dict[str, list[Request]]:
    same = SamplingParams(max_new_tokens=7, stop_token_ids=())
    return {
        "mixed": mixed_requests(engine, 8, seed=21),  # pages of different sizes, text-only rows, stop tokens
        # one page, same prompt: every mask is all-True (the dense paths)
        "identical": [engine.make_request(QUESTIONS[0], [PAGES[0]], same) for _ in range(4)],
        "one_page": [engine.make_request(q, [PAGES[0]], same) for q in QUESTIONS],  # prompts of different lengths
    }


@pytest.fixture(scope="module")
def expected_ids(model, processor):
    engine = Engine(model, processor, EngineConfig(max_slots=3, max_seq_len=160, **ALL_OFF))
    sets = request_sets(engine)
    return sets, {name: [r.token_ids for r in engine.generate(reqs)] for name, reqs in sets.items()}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_each_hot_path_switch_gives_the_same_tokens(model, processor, expected_ids, switch):
    sets, expected = expected_ids
    config = EngineConfig(max_slots=3, max_seq_len=160, **{**ALL_OFF, **SWITCHES[switch]})
    engine = Engine(model, processor, config)
    dense_steps = []
    real = engine.runner.decode_forward

    def spy(n, kv_len, m, dense, tokens, positions, **kw):
        dense_steps.append(dense)
        return real(n, kv_len, m, dense, tokens, positions, **kw)

    engine.runner.decode_forward = spy
    for name, reqs in sets.items():
        fresh = [Request(r.prompt_ids, r.images, r.sampling) for r in reqs]  # new ids and arrival times
        assert [r.token_ids for r in engine.generate(fresh)] == expected[name], f"{switch} changed {name}"
    assert any(dense_steps) == config.dense_attention, "the mask-free decode path was (not) taken"
    assert engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0


def test_switches_keep_the_logits_within_tolerance(model, processor):
    """Per step logits of one request, every switch on vs every switch off (fp32 on the CPU: 1e-4)."""

    def logits_of(config):
        engine = Engine(model, processor, config)
        seen = record_logits(engine)
        req = engine.make_request(QUESTIONS[1], [PAGES[0]], SamplingParams(max_new_tokens=12, stop_token_ids=()))
        engine.generate([req])
        return torch.cat(seen)  # (1 + decode steps, vocab)

    off = logits_of(EngineConfig(max_slots=1, max_seq_len=160, **ALL_OFF))
    on = logits_of(EngineConfig(max_slots=1, max_seq_len=160, **{**ALL_OFF, **SWITCHES["all"]}))
    assert on.shape == off.shape == (12, model.config.text.vocab_size), (on.shape, off.shape)
    assert (on - off).abs().max() < 1e-4


def test_late_copy_keeps_sampled_tokens_per_seed(model, processor):
    def run(late):
        engine = Engine(model, processor, EngineConfig(max_slots=4, max_seq_len=160, late_copy=late))
        reqs = mixed_requests(engine, 5, seed=3)
        reqs.append(
            engine.make_request(
                QUESTIONS[2], [PAGES[2]], SamplingParams(max_new_tokens=9, temperature=1.2, top_k=40, seed=11)
            )
        )
        # greedy, but reading host state (penalty counts, logprobs): these stay on the synchronous path
        for extra in (dict(repetition_penalty=1.3), dict(logprobs=True), dict(no_repeat_ngram_size=2)):
            reqs.append(engine.make_request(QUESTIONS[0], [PAGES[0]], SamplingParams(max_new_tokens=10, **extra)))
        results = engine.generate(reqs)
        return [(r.token_ids, r.finish_reason) for r in results], [r.logprobs for r in results]

    (late, late_lp), (sync, sync_lp) = run(True), run(False)
    assert late == sync
    for a, b in zip(late_lp, sync_lp, strict=True):  # logits of a row vary in the last bits with the batch size
        assert (a is None) == (b is None) and all(
            abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a or [], b or [], strict=True)
        )


def test_a_dropped_engine_is_freed_without_a_garbage_collection(model, processor):
    import gc
    import weakref

    from model.engine import DecodeGraphs

    engine = Engine(model, processor, EngineConfig(max_slots=2, max_seq_len=160, late_copy=True))
    engine.generate([engine.make_request(QUESTIONS[0], [PAGES[2]], SamplingParams(max_new_tokens=3))])
    engine.runner.graphs = DecodeGraphs(2, engine.device)  # what a CUDA engine holds (no capture on the CPU)
    kv = weakref.ref(engine.kv.k)
    ref = weakref.ref(engine)
    gc.disable()
    try:
        del engine
        assert ref() is None and kv() is None, "a reference cycle keeps the engine (and its caches) alive"
    finally:
        gc.enable()


def test_close_releases_the_caches_and_refuses_work(model, processor):
    import weakref

    engine = Engine(model, processor, EngineConfig(max_slots=2, max_seq_len=160))
    kv = weakref.ref(engine.kv.k)
    holder = [engine]  # somebody still holds the engine
    engine.close()
    assert kv() is None, "close() must drop the KV cache even while the engine is referenced"
    with pytest.raises(RuntimeError, match="closed"):
        holder[0].generate([engine.make_request(QUESTIONS[0], [], SamplingParams(max_new_tokens=2))])


def test_graph_report_says_graphs_were_not_used_on_the_cpu(model, processor):
    engine = Engine(model, processor, EngineConfig(max_slots=1, max_seq_len=160, cuda_graphs=True))
    engine.generate([engine.make_request(QUESTIONS[0], [], SamplingParams(max_new_tokens=2))])
    report = engine.graph_report()
    assert report["requested"] and not report["used"] and report["replays"] == 0


def test_a_failed_graph_capture_is_reported_and_decoding_goes_on_eagerly(model, processor):
    from model.engine import DecodeGraphs

    engine = Engine(model, processor, EngineConfig(max_slots=2, max_seq_len=160))
    engine.runner.graphs = DecodeGraphs(2, engine.device)  # capture needs CUDA: on the CPU it fails at the first step
    req = engine.make_request(QUESTIONS[0], [PAGES[0]], SamplingParams(max_new_tokens=6, stop_token_ids=()))
    got = engine.generate([req])[0].token_ids
    report = engine.graph_report()
    assert not report["used"] and "CUDA" in report["fallback"], report
    assert got == reference(model, processor, req)
