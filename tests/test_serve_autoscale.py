"""Autoscaling shown working on the local Ray with the tiny model: a bounded load ramp (benchmarks/autoscale.py's
`ramp`, the same code the benchmark draws) makes InfimmModel scale out from one replica and back in when the load
stops; during the ramp every answer is a 200 or a 503 with Retry-After, and the slow requests in flight while the
extra replica is removed all finish (graceful shutdown). About two minutes."""

from __future__ import annotations

import asyncio

from benchmarks.autoscale import AUTOSCALING, PHASES, deploy, ramp, summarize
from tests.conftest import free_port


def test_model_deployment_scales_out_under_load_and_back_in(ray_session, tiny_checkpoint):
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = _get_global_client().http_config.port
    deploy(str(tiny_checkpoint), "/autoscale", "autoscale")
    try:
        rec = asyncio.run(ramp(f"http://127.0.0.1:{port}/autoscale", "autoscale"))
    finally:
        serve.delete("autoscale")
    s = summarize(rec)
    print(s)
    assert rec.samples[0].running == 1, rec.samples[:3]
    assert s["max_running_replicas"] == AUTOSCALING["max_replicas"], s  # scaled out under the ramp
    assert s["final_running_replicas"] == 1, (s, rec.samples[-5:])  # and back in once the load stopped
    assert any(x.stopping for x in rec.samples), "a replica was seen draining"
    bad = [a for a in rec.answers if not (a.status == 200 or (a.status == 503 and a.retry_after))]
    assert not bad, bad[:5]
    scale_in = [a for a in rec.answers if a.phase == 2]  # one slow client while the extra replica goes away
    assert scale_in and all(a.status == 200 for a in scale_in), scale_in
    assert sum(a.status == 200 for a in rec.answers if a.phase == 1) >= PHASES[1][1], "the ramp was served"
