"""InfiMM-HD as one step of any Ray Dataset, with the shape and names of Ray's `ray.data.llm` processors.

    from pipelines.processor import InfimmProcessorConfig, build_processor
    config = InfimmProcessorConfig(checkpoint="/models/infimm-hd-13b", batch_size=16, concurrency=(1, 4),
                                   engine_kwargs=dict(max_slots=32), max_windows=16)
    processor = build_processor(
        config,
        preprocess=lambda row: dict(messages=[{"role": "user", "content": [
            {"type": "image", "image": row["image"]}, {"type": "text", "text": "Transcribe this page."}]}],
            sampling_params=dict(temperature=0, max_tokens=512)),
        postprocess=lambda row: dict(text=row["generated_text"], id=row["id"]),
    )
    out = processor(ds)  # lazy; out.write_parquet(...)

Stages (as Ray's processors: every input column is carried to the postprocess):

    Preprocess     ds.map: the user's function; its output is merged into the row (Ray's `wrap_preprocess`), then
                   `messages` and `sampling_params` are packed into one private column (images of any kind travel
                   pickled: a Dataset column of mixed bytes / PIL / numpy images has no Arrow type)
    Prepare        Ray tasks (CPU), one row each: resolve each image (bytes, PIL image, numpy array, `data:` URL,
                   local path, s3:// URI; a PDF page with `"page": n`), decode it and cut its windows with the batch
                   job's pieces (pipelines/decode.py: open_document, classify; model.windows.cut_views); check
                   the messages and the sampling parameters (each row's request: pipelines/messages.py)
    Engine         an actor pool (`concurrency`, `gpus_per_replica`), the batch job's GenerateStage (engine loaded
                   once per actor, one `generate` call per batch, a failing batch retried one request at a time)
    (or Server     with `server`: light client workers send the rows to a running Serve app of ours, images as data:
                   URLs, 503s retried; pipelines/replicas.py)
    Postprocess    ds.map: `messages` and `sampling_params` put back, the private columns dropped, then the user's
                   function; error rows bypass it (as Ray's `wrap_postprocess`) and keep every column

Output columns of the engine stage: `generated_text`, `finish_reason`, `num_input_tokens`, `num_generated_tokens`,
`time_taken_llm` (Ray's names), `encode_ms`, `ttft_ms`, `generate_ms` (as the batch job's), `error_type`,
`error_message`.

Bad rows: an image that cannot be read or decoded, messages the model cannot take, an unknown or invalid sampling
parameter and a prompt too long for the engine's context give that row `error_type` / `error_message` (the batch
job's types, pipelines/rows.py) and null text; the rest finish. `should_continue_on_error=False` raises instead
(Ray's flag; its default there is False, here True, because one bad scan in a million should not stop a job).

Why not `ray.data.llm.build_processor` itself: it dispatches on `type(config).__name__` through
`ray.llm._internal.batch.processor.ProcessorBuilder`, and a config type can only be added with
`ProcessorBuilder.register` and built from `StatefulStage`s (`ray.llm._internal.batch.stages`) applied with
`Dataset.map_batches_internal`: all internal, free to change in a minor release. So `build_processor` here has the
same signature and the same row contract, on public Ray Data calls only (`map`, `map_batches`, `ActorPoolStrategy`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from model.windows import WindowConfig

from .cluster import cpu_engine_args
from .decode import DecodeConfig, classify
from .generate import GenerateConfig, GenerateStage
from .messages import IMAGE_TYPE, cut_image, image_url, sampling_kwargs, split_messages
from .replicas import ServerSettings, ServerStage
from .storage import S3Settings, Storage

log = logging.getLogger(__name__)

REQUEST = "__infimm_request"  # pickled (messages, sampling_params) of a row, from the preprocess to the postprocess
IMAGES = "__infimm_images"  # the row's images, cut into views (Prepare -> Engine)
URLS = "__infimm_urls"  # or, for a server, as data: URLs (Prepare -> Server)
PROMPT = "__infimm_prompt"  # JSON: the messages with each image replaced by its index in IMAGES
SAMPLING = "__infimm_sampling"  # JSON: SamplingParams keyword arguments, checked
ERROR_TYPE, ERROR_MESSAGE = "error_type", "error_message"
PRIVATE = (REQUEST, IMAGES, URLS, PROMPT, SAMPLING)

OUTPUT_COLUMNS = {
    "generated_text": pa.string(),
    "finish_reason": pa.string(),
    "num_input_tokens": pa.int32(),
    "num_generated_tokens": pa.int32(),
    "time_taken_llm": pa.float64(),  # seconds, arrival at the engine -> last token
    "encode_ms": pa.float64(),  # the ViT batch that included the row's images (0 when cached)
    "ttft_ms": pa.float64(),
    "generate_ms": pa.float64(),  # prefill + decode, steps shared with the rest of the batch included
    ERROR_TYPE: pa.string(),
    ERROR_MESSAGE: pa.string(),
}
SERVER_COLUMNS = {**OUTPUT_COLUMNS, "attempts": pa.int32()}  # HTTP attempts, 503 retries included


@dataclass(frozen=True)
class InfimmProcessorConfig:
    """What `ray.data.llm`'s engine configs hold, for InfiMM-HD. `engine_kwargs` are `model.engine.EngineConfig`
    fields (max_slots, max_seq_len, quantize, gpu_memory_utilization, ...)."""

    checkpoint: str
    batch_size: int = 16  # rows per engine call (they share ViT batches and decode steps)
    concurrency: int | tuple[int, int] = 1  # engine replicas: n (a fixed pool) or (min, max) (autoscaling)
    gpus_per_replica: float | None = None  # None: 1 if the cluster has GPUs when the processor is applied, else 0
    cpus_per_replica: float = 1.0
    accelerator_type: str | None = None  # e.g. "H100": engine replicas only on such nodes (a Ray remote option)
    engine_kwargs: dict = field(default_factory=dict)
    max_windows: int = 16  # 448x448 windows per image (plus the thumbnail)
    dpi: int = 150  # PDF pages
    max_render_pixels: int = 12_000_000  # a rendered PDF page is at most this many pixels
    prepare_cpus: float = 1.0  # per image-decoding task
    # Reserved per decoding task; also what keeps decoding out of the engine actors on a CPU-only cluster (Ray Data
    # fuses stages with identical resource asks). The batch job's measured default (docs/batch.md).
    prepare_memory: int = 1536 * 2**20
    should_continue_on_error: bool = True  # bad rows -> error_type / error_message; False: raise
    s3: S3Settings = field(default_factory=S3Settings.from_env)  # for s3:// image URIs
    device: str | None = None  # engine device; None: cuda when the replica has a GPU, else cpu
    torch_threads: int | None = None  # CPU engines: intra-op threads (None: cpus_per_replica)
    metrics: str = "ray"  # runtime.metrics backend of the engine replicas: "none" where nothing runs in Ray
    # Batch through running replicas (pipelines/replicas.py): rows go to this Serve app's OpenAI endpoint; no engine
    # actors start, `concurrency` is then the number of client workers (each `server.requests_in_flight` at a time)
    server: ServerSettings | None = None
    client_cpus: float = 0.25  # per client worker (it waits on HTTP)

    def __post_init__(self):
        c = self.concurrency
        if isinstance(c, list):
            object.__setattr__(self, "concurrency", c := tuple(c))
        ok = (isinstance(c, int) and not isinstance(c, bool) and c >= 1) or (
            isinstance(c, tuple) and len(c) == 2 and all(isinstance(x, int) for x in c) and 1 <= c[0] <= c[1]
        )
        if not ok:
            raise ValueError(f"concurrency must be an int >= 1 or a (min, max) pair with 1 <= min <= max, got {c!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.checkpoint:
            raise ValueError("checkpoint is required (a folder in the official layout)")
        from model.engine import EngineConfig

        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(self.engine_kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine_kwargs {unknown}; EngineConfig takes {sorted(known)}")
        DecodeConfig(dpi=self.dpi, max_render_pixels=self.max_render_pixels)  # its checks

    @property
    def pool(self) -> dict:
        c = self.concurrency
        return {"size": c} if isinstance(c, int) else {"min_size": c[0], "max_size": c[1]}

    def engine_config(self):
        from model.engine import EngineConfig

        kw = {"max_views": self.max_windows + 1, **self.engine_kwargs}  # a slot keeps every view of a page
        return EngineConfig(**kw)

    def windows(self) -> WindowConfig:
        """What a row's images are cut into: `max_windows` at the window size of the checkpoint's ViT (its
        config.json). Resolved once when the processor is applied; the Prepare tasks and the engine actors get it."""
        from model.processor import checkpoint_windows

        return checkpoint_windows(self.checkpoint, WindowConfig(max_windows=self.max_windows))


def _raise_or(config: InfimmProcessorConfig, error_type: str, message: str) -> tuple[str, str]:
    if not config.should_continue_on_error:
        raise ValueError(f"{error_type}: {message} (should_continue_on_error=True makes this an error row instead)")
    from .rows import error_fields

    e = error_fields(error_type, message)
    return e[ERROR_TYPE], e[ERROR_MESSAGE]


def _set(table: pa.Table, name: str, values: list, type_: pa.DataType) -> pa.Table:
    col = pa.array(values, type=type_)
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, col) if i >= 0 else table.append_column(name, col)


# ---- the stages --------------------------------------------------------------------------------------------------
class Preprocess:
    """ds.map: the user's function merged into the row (Ray's contract), then the request packed into REQUEST."""

    def __init__(self, fn: Callable[[dict], dict] | None):
        self.fn = fn

    def __call__(self, row: dict) -> dict:
        row = dict(row)
        if self.fn is not None:
            row.update(self.fn(row))
        request = (row.pop("messages", None), row.pop("sampling_params", None))
        row[REQUEST] = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        return row


class Prepare:
    """Ray tasks (CPU): REQUEST -> IMAGES, PROMPT, SAMPLING, or an error. Unit tests call it on a pyarrow table.
    `windows`: `config.windows()`, resolved by whoever also builds the engine stage."""

    def __init__(self, config: InfimmProcessorConfig, windows: WindowConfig):
        self.config = config
        self.decode = DecodeConfig(windows=windows, dpi=config.dpi, max_render_pixels=config.max_render_pixels)
        self.storage = Storage(config.s3)

    def __call__(self, batch: pa.Table) -> pa.Table:
        images, prompts, samplings, etypes, emessages = [], [], [], [], []
        for raw in batch.column(REQUEST).to_pylist():
            out = self.row(raw)
            images.append(out[0])
            prompts.append(out[1])
            samplings.append(out[2])
            etypes.append(out[3])
            emessages.append(out[4])
        to_server = self.config.server is not None
        batch = _set(batch, URLS if to_server else IMAGES, images, pa.list_(pa.string()) if to_server else IMAGE_TYPE)
        batch = _set(batch, PROMPT, prompts, pa.string())
        batch = _set(batch, SAMPLING, samplings, pa.string())
        batch = _set(batch, ERROR_TYPE, etypes, pa.string())
        return _set(batch, ERROR_MESSAGE, emessages, pa.string())

    def row(self, raw: bytes) -> tuple:
        messages, params = pickle.loads(raw)
        try:
            turns, refs = split_messages(messages)
            sampling = sampling_kwargs(params)
        except ValueError as e:
            return (None, None, None, *_raise_or(self.config, "invalid_request", str(e)))
        cut = []
        for i, (image, page) in enumerate(refs):
            try:
                prepare = image_url if self.config.server is not None else cut_image
                cut.append(prepare(image, page, self.storage, self.decode))
            except ValueError as e:
                kind = getattr(e, "kind", None) or "invalid_request"  # ImageError carries its kind
                return (None, None, None, *_raise_or(self.config, kind, f"image {i + 1}: {e}"))
            except Exception as e:  # noqa: BLE001 - storage and PDF failures: typed as the batch job types them
                kind, message = classify(e)
                return (None, None, None, *_raise_or(self.config, kind, f"image {i + 1}: {message}"))
        return cut, json.dumps(turns), json.dumps(sampling), None, None


class Engine(GenerateStage):
    """The engine actor: the batch job's GenerateStage (loading, metrics, one-by-one retry of a failing batch) with
    the engine built from the processor's settings, over rows that already hold their views and checked parameters."""

    def __init__(self, config: InfimmProcessorConfig, windows: WindowConfig):
        self.processor_config = config
        threads = config.torch_threads or max(1, int(config.cpus_per_replica))
        generate = GenerateConfig(
            checkpoint=config.checkpoint, device=config.device, torch_threads=threads, metrics=config.metrics
        )
        super().__init__(generate, windows)
        self._engine_config = config.engine_config()

    @property
    def engine(self):
        if self._engine is None:
            from model.engine import Engine as InfimmEngine

            self._engine = InfimmEngine.from_pretrained(
                self.config.checkpoint,
                device=self.device,
                config=self._engine_config,
                windows=self.windows,
                observer=self.metrics.engine_observer(),
            )
        return self._engine

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from model.processor import ChatMessage
        from model.sampling import SamplingParams
        from model.windows import PageViews

        n = batch.num_rows
        cols = {name: [None] * n for name in OUTPUT_COLUMNS}
        cols[ERROR_TYPE] = batch.column(ERROR_TYPE).to_pylist()
        cols[ERROR_MESSAGE] = batch.column(ERROR_MESSAGE).to_pylist()
        live, requests = [], []
        for i, (imgs, prompt, sampling) in enumerate(
            zip(
                batch.column(IMAGES).to_pylist(),
                batch.column(PROMPT).to_pylist(),
                batch.column(SAMPLING).to_pylist(),
                strict=True,
            )
        ):
            if cols[ERROR_TYPE][i]:
                continue
            pages = [
                PageViews(
                    views=torch.frombuffer(bytearray(im["views"]), dtype=torch.uint8).view(
                        im["n_views"], 3, im["window"], im["window"]
                    ),
                    rows=im["rows"],
                    cols=im["cols"],
                    width=im["width"],
                    height=im["height"],
                    key=im["key"],
                )
                for im in imgs
            ]
            turns = [
                ChatMessage(t["role"], [p if isinstance(p, str) else pages[p["image"]] for p in t["parts"]])
                for t in json.loads(prompt)
            ]
            try:
                req = self.engine.make_chat_request(turns, SamplingParams(**json.loads(sampling)))
                self.engine.validate(req)
            except ValueError as e:
                cols[ERROR_TYPE][i], cols[ERROR_MESSAGE][i] = _raise_or(
                    self.processor_config, "invalid_request", str(e)
                )
                continue
            live.append(i)
            requests.append(req)
        for i, res in zip(live, self._generate(requests), strict=True):
            if isinstance(res, Exception):
                cols[ERROR_TYPE][i], cols[ERROR_MESSAGE][i] = _raise_or(
                    self.processor_config, "generation_error", f"{type(res).__name__}: {res}"
                )
                continue
            t = res.timings
            for name, value in (
                ("generated_text", res.text),
                ("finish_reason", res.finish_reason),
                ("num_input_tokens", res.prompt_tokens),
                ("num_generated_tokens", res.completion_tokens),
                ("time_taken_llm", t.total_s),
                ("encode_ms", t.encode_s * 1e3),
                ("ttft_ms", t.ttft_s * 1e3),
                ("generate_ms", (t.prefill_s + t.decode_s) * 1e3),
            ):
                cols[name][i] = value
        for e in cols[ERROR_TYPE]:
            self.metrics.page_done(e)
        batch = batch.drop_columns([IMAGES, PROMPT, SAMPLING])
        for name, type_ in OUTPUT_COLUMNS.items():
            batch = _set(batch, name, cols[name], type_)
        return batch


class Server(ServerStage):
    """Client worker for running replicas: the prepared rows -> the engine stage's columns (+ `attempts`)."""

    def __init__(self, config: InfimmProcessorConfig):
        super().__init__(config.server, continue_on_error=config.should_continue_on_error)

    def __call__(self, batch: pa.Table) -> pa.Table:
        answers = self.answers(
            batch.column(PROMPT).to_pylist(),
            batch.column(URLS).to_pylist(),
            batch.column(SAMPLING).to_pylist(),
            batch.column(ERROR_TYPE).to_pylist(),
        )
        errors = batch.column(ERROR_TYPE).to_pylist(), batch.column(ERROR_MESSAGE).to_pylist()
        batch = batch.drop_columns([URLS, PROMPT, SAMPLING])
        for name, type_ in SERVER_COLUMNS.items():
            values = [a.get(name) for a in answers]
            if name in (ERROR_TYPE, ERROR_MESSAGE):  # the Prepare stage's, else the server's verdict
                earlier = errors[0] if name == ERROR_TYPE else errors[1]
                values = [e or v for e, v in zip(earlier, values, strict=True)]
            batch = _set(batch, name, values, type_)
        return batch


class Postprocess:
    """ds.map: `messages` and `sampling_params` back in the row, private columns out, then the user's function; an
    error row bypasses it (Ray's contract: a postprocess written for answers does not crash on a row without one)."""

    def __init__(self, fn: Callable[[dict], dict] | None):
        self.fn = fn

    def __call__(self, row: dict) -> dict:
        row = dict(row)
        messages, params = pickle.loads(row.pop(REQUEST))
        for k in PRIVATE:
            row.pop(k, None)
        row["messages"], row["sampling_params"] = messages, params
        if row.get(ERROR_TYPE) or self.fn is None:
            return row
        return self.fn(row)


class Processor:
    """preprocess -> Prepare (CPU tasks) -> Engine (actor pool) -> postprocess, applied lazily to a Dataset."""

    def __init__(
        self,
        config: InfimmProcessorConfig,
        preprocess: Callable[[dict], dict] | None = None,
        postprocess: Callable[[dict], dict] | None = None,
        preprocess_map_kwargs: dict | None = None,
        postprocess_map_kwargs: dict | None = None,
    ):
        self.config = config
        self.preprocess = Preprocess(preprocess)
        self.postprocess = Postprocess(postprocess)
        self.preprocess_map_kwargs = preprocess_map_kwargs or {}
        self.postprocess_map_kwargs = postprocess_map_kwargs or {}

    def list_stage_names(self) -> list[str]:
        return ["Prepare", "Engine"]

    def gpus_per_replica(self) -> float:
        if self.config.gpus_per_replica is not None:
            return self.config.gpus_per_replica
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def __call__(self, dataset):
        from ray.data import ActorPoolStrategy

        cfg = self.config
        gpus = 0.0 if cfg.server is not None else self.gpus_per_replica()
        engine_args: dict = {"num_gpus": gpus, "num_cpus": cfg.cpus_per_replica}
        if cfg.accelerator_type:
            engine_args["accelerator_type"] = cfg.accelerator_type
        engine_args |= cpu_engine_args(gpus)  # an engine on the CPU leaves the cores to the decode tasks
        windows = cfg.windows()  # once: the Prepare tasks cut into what the engine actors read
        ds = dataset.map(self.preprocess, **self.preprocess_map_kwargs)
        ds = ds.map_batches(
            Prepare(cfg, windows),  # an instance: Ray tasks, as the batch job's decode stage
            batch_size=1,  # one row per task: a row's images are its whole cost, so tasks stay even
            batch_format="pyarrow",
            num_cpus=cfg.prepare_cpus,
            memory=cfg.prepare_memory,
        )
        if cfg.server is not None:  # running replicas answer: light client workers instead of engine actors
            ds = ds.map_batches(
                Server,
                fn_constructor_args=(cfg,),
                batch_size=cfg.batch_size,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(**cfg.pool),
                num_cpus=cfg.client_cpus,
            )
            return ds.map(self.postprocess, **self.postprocess_map_kwargs)
        ds = ds.map_batches(
            Engine,
            fn_constructor_args=(cfg, windows),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(**cfg.pool),
            **engine_args,
        )
        return ds.map(self.postprocess, **self.postprocess_map_kwargs)


def build_processor(
    config: InfimmProcessorConfig,
    preprocess: Callable[[dict], dict] | None = None,
    postprocess: Callable[[dict], dict] | None = None,
    preprocess_map_kwargs: dict | None = None,
    postprocess_map_kwargs: dict | None = None,
    builder_kwargs: dict | None = None,
) -> Processor:
    """`ray.data.llm.build_processor`'s signature and contract for InfiMM-HD (see the module docstring for why it is
    not registered with Ray's own). `builder_kwargs` exists for the same signature; this builder takes none."""
    if builder_kwargs:
        raise ValueError(f"builder_kwargs: this processor takes none, got {sorted(builder_kwargs)}")
    return Processor(config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs)
