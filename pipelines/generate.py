"""GPU stage of the batch job: decoded pages in, one result row per (page, prompt) out.

All pages of a batch go to the engine in one `generate` call: they come from many documents, and the engine encodes
their windows through the ViT together and decodes them in shared steps (continuous batching over `max_slots`). A page
asked several prompts is encoded once (the engine's feature cache is keyed by content).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from model.engine import Engine, EngineConfig, Request, Result
from model.processor import checkpoint_windows
from model.sampling import SamplingParams
from model.windows import PageViews, WindowConfig, feature_key

from .rows import OUTPUT_SCHEMA, error_fields, row_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    checkpoint: str
    max_new_tokens: int = 512
    max_windows: int = 16
    max_slots: int = 16
    device: str | None = None  # None: cuda when this actor has a GPU, else cpu
    torch_threads: int | None = None  # CPU only: intra-op threads (None: torch's default)
    model_name: str | None = None  # `model` column; None: the checkpoint folder's name
    metrics: str = "ray"  # runtime.metrics backend: "ray" inside Ray, "none" in unit tests


class GenerateStage:
    """Loads the engine once per actor (in `__init__`); `__call__` maps a batch of DECODED rows to OUTPUT rows."""

    def __init__(self, config: GenerateConfig):
        from runtime.metrics import Metrics

        self.config = config
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu" and config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.metrics = Metrics(frontend="batch", backend=config.metrics)
        # as the decode stage cut the pages (window size from the checkpoint)
        self.windows = checkpoint_windows(config.checkpoint, WindowConfig(max_windows=config.max_windows))
        self.engine = Engine.from_pretrained(
            config.checkpoint,
            device=device,
            # one slot keeps the thumbnail and every window of a page
            config=EngineConfig(max_slots=config.max_slots, max_views=config.max_windows + 1),
            windows=self.windows,
            observer=self.metrics.engine_observer(),
        )
        self.sampling = SamplingParams(max_new_tokens=config.max_new_tokens)
        self.model_name = config.model_name or Path(config.checkpoint).name
        log.info("generate stage ready on %s (pid %d): %s", device, os.getpid(), self.model_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[dict] = []
        pending: list[tuple[Request, dict]] = []  # requests to run and the row each one fills
        for page in batch.to_pylist():
            base = {
                "source_uri": page["source_uri"],
                "page": page["page"],
                "model": self.model_name,
                "width": page["width"],
                "height": page["height"],
                "grid_rows": page["grid_rows"],
                "grid_cols": page["grid_cols"],
            }
            rows = [{**base, "id": row_id(page["doc"], page["page"], p), "prompt": p} for p in page["prompts"]]
            if page["error_type"]:
                out += [{**r, "error_type": page["error_type"], "error_message": page["error_message"]} for r in rows]
                continue
            w = page["window"]
            views = torch.frombuffer(bytearray(page["views"]), dtype=torch.uint8).view(page["n_views"], 3, w, w)
            # A page of a document is unique within a job (which cuts every page with one window setting): naming
            # it is far cheaper than hashing ~3-10 MB of views in this GPU-feeding process.
            pv = PageViews(
                views=views,
                rows=page["grid_rows"],
                cols=page["grid_cols"],
                width=page["width"],
                height=page["height"],
                key=feature_key(f"{page['doc']}#{page['page']}", self.windows),
            )
            for r in rows:
                try:
                    req = self.engine.make_request(r["prompt"], [pv], self.sampling)
                    self.engine.validate(req)
                except ValueError as e:
                    out.append({**r, **error_fields("invalid_request", str(e))})
                    continue
                pending.append((req, r))
                out.append(r)
        for (_, r), res in zip(pending, self._generate([req for req, _ in pending]), strict=True):
            if isinstance(res, Exception):
                r.update(error_fields("generation_error", f"{type(res).__name__}: {res}"))
            else:
                r.update(_result_fields(res))
        for r in out:
            self.metrics.page_done(r.get("error_type"))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _generate(self, requests: list[Request]) -> list[Result | Exception]:
        """All together; if that fails, one at a time, so one poisonous page costs only its own row."""
        if not requests:
            return []
        try:
            return self.engine.generate(requests)  # on failure the engine finishes what was in flight and raises
        except Exception:
            log.exception("batch of %d requests failed; retrying them one by one", len(requests))
        results: list[Result | Exception] = []
        for req in requests:
            try:
                results.append(self.engine.generate([req])[0])
            except Exception as e:  # noqa: BLE001 - the request becomes a generation_error row
                log.warning("request failed alone too: %s", e)
                results.append(e)
        return results


def _result_fields(res: Result) -> dict:
    t = res.timings
    return {
        "text": res.text,
        "finish_reason": res.finish_reason,
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        # encode: the ViT batch that included this page (0 when its features came from the cache);
        # generate: prefill + decode of this request, steps shared with the rest of the batch included
        "encode_ms": t.encode_s * 1e3,
        "generate_ms": (t.prefill_s + t.decode_s) * 1e3,
    }
