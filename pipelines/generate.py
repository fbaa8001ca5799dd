"""GPU stage of the batch job: decoded pages in, one result row per (page, prompt) out.

All pages of a batch go to the engine in one `generate` call: they come from many documents, and the engine encodes
their windows through the ViT together and decodes them in shared steps (continuous batching over `max_slots`). A page
asked several prompts is encoded once (the engine's feature cache is keyed by content).

Repetition guard and temperature ladder (after olmOCR, which retries a failed page with rising temperatures): the
engine ends a sequence caught in a loop with finish_reason "repetition" (SamplingParams.repetition_guard). Such rows
are asked again, all of a batch's looping rows together, attempt k >= 2 at temperature `temperature_ladder[k - 2]`
(the last rung repeats if `max_attempts` outlasts the ladder) with a seed derived from the row id and k, so a rerun
gives the same answer whatever else shares the batch. The first answer that does not loop is kept; a row whose every
attempt looped becomes an error row (`error_type="repetition"`, text null, like every error row, so that a reader
taking the rows without error_type gets no loops). Each row records `attempts` and the finish reason and
temperature of each attempt.

Pages answered by their PDF text layer (decoded rows with `text_source="pdf_text"`) never reach the engine; the
engine is loaded on the first page that needs it, so a job of born-digital PDFs never loads the weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from model.engine import Engine, EngineConfig, Request, Result
from model.sampling import SamplingParams
from model.windows import PageViews, WindowConfig, feature_key

from .rows import LADDER, OUTPUT_SCHEMA, error_fields, row_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    checkpoint: str = ""  # official-layout folder; required to load the engine
    max_new_tokens: int = 512
    max_slots: int = 16  # with gpu_memory_utilization: an upper bound
    quantize: str = "none"  # weights: none | int8 | int4 | fp8 (model/quantize.py)
    gpu_memory_utilization: float | None = None  # size slots and the ViT batch to this fraction of the card
    device: str | None = None  # None: cuda when this actor has a GPU, else cpu
    torch_threads: int | None = None  # CPU only: intra-op threads (None: torch's default)
    model_name: str | None = None  # `model` column; None: the checkpoint folder's name
    metrics: str = "ray"  # runtime.metrics backend: "ray" inside Ray, "none" in unit tests
    # -- sampling and the repetition guard (see the module docstring) --
    repetition_penalty: float = 1.0  # HF/CTRL penalty on tokens already seen; 1 = off
    no_repeat_ngram_size: int = 0  # ban repeating any n-gram of the output; 0 = off
    repetition_guard: bool = True  # end loops with finish_reason "repetition" and retry them up the ladder
    temperature_ladder: tuple[float, ...] = LADDER
    max_attempts: int = 1 + len(LADDER)  # per row, the first (greedy) attempt included; 1 = never retry

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts must be >= 1, got {self.max_attempts}")
        if self.max_attempts > 1 and not self.temperature_ladder:
            raise ValueError("--temperature-ladder is empty but --max-attempts allows retries")
        if any(t < 0 for t in self.temperature_ladder):
            raise ValueError(f"--temperature-ladder temperatures must be >= 0, got {self.temperature_ladder}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    def temperature(self, attempt: int) -> float:
        """Attempt 1 is greedy (the job's answer when nothing loops); attempt k >= 2 climbs the ladder."""
        return 0.0 if attempt == 1 else self.temperature_ladder[min(attempt - 2, len(self.temperature_ladder) - 1)]

    def sampling(self, attempt: int, row_id: str) -> SamplingParams:
        temperature = self.temperature(attempt)
        seed = None
        if temperature > 0:  # per row and attempt: independent of what shares the batch, the same on a rerun
            seed = int.from_bytes(hashlib.blake2b(f"{row_id}#{attempt}".encode(), digest_size=8).digest()[:7], "big")
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            seed=seed,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            repetition_guard=self.repetition_guard,
        )


class GenerateStage:
    """Loads the engine once per actor (on first use); `__call__` maps a batch of DECODED rows to OUTPUT rows.
    `windows`: those the decode stage cut the pages into (resolved once from the checkpoint by whoever built both)."""

    def __init__(self, config: GenerateConfig, windows: WindowConfig):
        from runtime.metrics import Metrics

        self.config = config
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu" and config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.metrics = Metrics(frontend="batch", backend=config.metrics)
        self.windows = windows
        self.model_name = config.model_name or Path(config.checkpoint).name
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine.from_pretrained(
                self.config.checkpoint,
                device=self.device,
                # one slot keeps the thumbnail and every window of a page
                config=EngineConfig(
                    max_slots=self.config.max_slots,
                    max_views=self.windows.max_windows + 1,
                    quantize=self.config.quantize,
                    gpu_memory_utilization=self.config.gpu_memory_utilization,
                ),
                windows=self.windows,
                observer=self.metrics.engine_observer(),
            )
            log.info("generate stage ready on %s (pid %d): %s", self.device, os.getpid(), self.model_name)
        return self._engine

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[dict] = []
        pending: list[tuple[dict, PageViews]] = []  # rows for the engine and the page each one asks about
        for page in batch.to_pylist():
            base = {
                "source_uri": page["source_uri"],
                "page": page["page"],
                "model": self.model_name,
                "width": page["width"],
                "height": page["height"],
                "grid_rows": page["grid_rows"],
                "grid_cols": page["grid_cols"],
                "pdf_text": page.get("pdf_text"),
            }
            rows = [{**base, "id": row_id(page["doc"], page["page"], p), "prompt": p} for p in page["prompts"]]
            out += rows
            if page["error_type"]:
                for r in rows:
                    r.update(error_type=page["error_type"], error_message=page["error_message"])
                continue
            if page.get("text_source") == "pdf_text":  # --use-pdf-text: the text layer is the answer, no engine call
                for r in rows:
                    r.update(text=page["pdf_text"], text_source="pdf_text", attempts=0)
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
            pending += [(r, pv) for r in rows]
        self._answer(pending)
        for r in out:
            self.metrics.page_done(r.get("error_type"))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _answer(self, pending: list[tuple[dict, PageViews]]) -> None:
        """Fill each row with the engine's answer, asking again up the temperature ladder while it loops."""
        cfg = self.config
        for attempt in range(1, cfg.max_attempts + 1):
            if not pending:
                return
            live: list[tuple[dict, PageViews]] = []
            requests: list[Request] = []
            for r, pv in pending:
                try:
                    req = self.engine.make_request(r["prompt"], [pv], cfg.sampling(attempt, r["id"]))
                    self.engine.validate(req)
                except ValueError as e:
                    r.update(error_fields("invalid_request", str(e)))
                    continue
                live.append((r, pv))
                requests.append(req)
            pending = []
            for (r, pv), res in zip(live, self._generate(requests), strict=True):
                r["attempts"] = attempt
                r.setdefault("attempt_temperatures", []).append(cfg.temperature(attempt))
                reasons = r.setdefault("attempt_finish_reasons", [])
                if isinstance(res, Exception):
                    reasons.append("error")
                    r.update(error_fields("generation_error", f"{type(res).__name__}: {res}"))
                    continue
                reasons.append(res.finish_reason)
                _add_result(r, res)
                if res.finish_reason == "repetition":
                    pending.append((r, pv))
        for r, _ in pending:  # every attempt looped
            temps = ", ".join(f"{t:g}" for t in r["attempt_temperatures"])
            r.update(text=None, text_source=None)
            r.update(error_fields("repetition", f"all {r['attempts']} attempts looped (temperatures {temps})"))

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


def _add_result(row: dict, res: Result) -> None:
    """The attempt's answer replaces an earlier one's; the times add up over attempts (what the row cost)."""
    t = res.timings
    row.update(
        text=res.text,
        text_source="model",
        finish_reason=res.finish_reason,
        prompt_tokens=res.prompt_tokens,
        completion_tokens=res.completion_tokens,
        # encode: the ViT batch that included this page (0 when its features came from the cache);
        # generate: prefill + decode of this request, steps shared with the rest of the batch included
        encode_ms=row.get("encode_ms", 0.0) + t.encode_s * 1e3,
        generate_ms=row.get("generate_ms", 0.0) + (t.prefill_s + t.decode_s) * 1e3,
    )
