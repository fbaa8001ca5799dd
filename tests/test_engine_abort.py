"""Aborting a request that waits behind an identical one: the engine drops it as "abort" and the others run on.

A disconnected client's request is aborted wherever it is (`Engine.abort` marks it; the next step drops it). Requests
for the same page and prompt (clients retrying, a page asked by several users) are equal field by field, down to
their view tensors, so finding the aborted one in the waiting queue by equality asked a tensor for its truth value:
the step raised, and the engine failed every request in flight as "error" (the Serve test saw no "abort" at all).
"""

from __future__ import annotations

import asyncio

from model.engine import Engine, EngineConfig
from model.sampling import SamplingParams

from .model_helpers import Finishes, page


def test_aborting_a_request_queued_behind_an_identical_one_aborts_only_it(tiny_checkpoint):
    finished = Finishes()
    engine = Engine.from_pretrained(tiny_checkpoint, device="cpu", config=EngineConfig(max_slots=1), observer=finished)
    png = page(600, 400, "Same page for everyone")
    sampling = SamplingParams(max_new_tokens=48, min_new_tokens=48)  # A holds the only slot while B and C wait
    a, b, c = (engine.make_request("Transcribe.", [png], sampling, request_id=i) for i in "abc")

    async def main():
        streams = {r.request_id: engine.stream(r) for r in (a, b, c)}
        first_a = await asyncio.wait_for(anext(streams["a"]), 60)  # A is admitted and decoding
        assert first_a.result is None, "A finished before B and C queued: raise max_new_tokens"
        waiting = {k: asyncio.create_task(anext(streams[k])) for k in "bc"}
        await asyncio.sleep(0.05)  # B then C enter the waiting queue, in that order
        assert engine.stats()["waiting"] == 2, engine.stats()
        waiting["c"].cancel()  # the client of C goes away: cancelling its stream aborts it in the engine
        await asyncio.gather(waiting["c"], return_exceptions=True)

        async def drain(key: str, pending=None):
            if pending is not None:
                await pending
            async for _ in streams[key]:
                pass

        await asyncio.wait_for(asyncio.gather(drain("a"), drain("b", waiting["b"])), 120)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert finished.reasons == {"a": "length", "b": "length", "c": "abort"}, finished.reasons
