"""What a batch job is asked to do: `JobConfig`, with the settings of its two stages nested in it.

    JobConfig
      .decode     DecodeConfig (pipelines/decode.py): windows per page, PDF dpi and page limits, the PDF text layer
      .generate   GenerateConfig (pipelines/generate.py): checkpoint, engine size, sampling, the repetition guard
      the rest    the job's own: inputs, output, actor pools and resources, writing, storage, a Serve app to ask

Each value is defined, defaulted and checked once, in the config that holds it; the job hands each stage its own
config instead of copying fields between layers. A new stage setting is a field of that stage's config and a flag in
pipelines/cli.py; one that changes what a row holds is also recorded by `result_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .decode import DecodeConfig
from .generate import GenerateConfig
from .replicas import ServerSettings
from .storage import S3Settings


@dataclass(frozen=True)
class JobConfig:
    inputs: tuple[str, ...]
    output: str
    prompts: tuple[str, ...] = ()  # for documents without a manifest prompt
    # the engine stage; its checkpoint also sets the window size of the decode stage (`with_checkpoint_windows`)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # `decode.windows.max_windows`: windows per page
    actors: tuple[int, int] = (1, 1)  # GPU-stage actor pool, autoscaling between these
    gpus_per_actor: float | None = None  # None: 1 if the cluster has GPUs, else 0 (engine on CPU)
    cpus_per_actor: float = 1.0  # (on the CPU also the engine's torch threads, unless generate.torch_threads)
    batch_size: int = 16  # pages per engine call (they share ViT batches and decode steps)
    decode_cpus: float = 1.0  # per decode task
    # Memory reserved per decode task: what a task's worker process peaked at (USS, what Ray Data compares with the
    # reservation) with the default settings, over the page kinds of benchmarks/decode_memory.py, plus a quarter.
    # It also keeps decoding in its own tasks on CPU-only clusters: with identical resource asks Ray Data would fuse
    # it into the engine actors.
    decode_memory: int = 1536 * 2**20
    resume: bool = True
    rows_per_file: int = 5000
    flush_seconds: float = 60.0  # at most this much finished work is lost to a hard kill
    s3: S3Settings = field(default_factory=S3Settings)
    ray_progress: bool = False  # Ray Data's own per-operator progress bars
    # A pool the cluster cannot place is refused up front; with this, waited for (an autoscaling cluster adds nodes).
    wait_for_resources: bool = False
    documents_out: str | None = None  # folder for one text file per document + documents.jsonl (documents_out.py)
    # Pages to a running Serve app of ours instead of engine actors (pipelines/replicas.py); `actors` is then the pool
    # of light client workers, `generate.checkpoint` the one the replicas serve (window size, `model` column)
    server: ServerSettings | None = None

    def __post_init__(self):
        lo, hi = self.actors
        if not 1 <= lo <= hi:
            raise ValueError(f"--actors MIN,MAX needs 1 <= MIN <= MAX, got {lo},{hi}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.inputs:
            raise ValueError("give at least one --input")
        if self.rows_per_file < 1 or self.flush_seconds < 0:
            raise ValueError("--rows-per-file must be >= 1 and --flush-seconds >= 0")

    def with_checkpoint_windows(self) -> JobConfig:
        """This job with `decode.windows` at the window size of the checkpoint's ViT (its config.json): the windows
        the decode tasks cut pages into and the engine actors read. The job resolves them once, for both stages."""
        from model.processor import checkpoint_windows

        windows = checkpoint_windows(self.generate.checkpoint, self.decode.windows)
        return replace(self, decode=replace(self.decode, windows=windows))


def result_settings(config: JobConfig) -> dict:
    """The settings that change what a row contains, as `_job.json` records them (a resumed run with other values
    mixes two kinds of rows, and says so). Flat keys, values as JSON reads them back: the format earlier runs wrote,
    so their outputs compare equal and resume without a warning."""
    g, d = config.generate, config.decode
    return {
        "checkpoint": str(g.checkpoint),
        "max_new_tokens": g.max_new_tokens,
        "dpi": d.dpi,
        "max_windows": d.windows.max_windows,
        "quantize": g.quantize,
        "use_pdf_text": d.use_pdf_text,
        "pdf_text_min_chars": d.pdf_text_min_chars,
        "repetition_penalty": g.repetition_penalty,
        "no_repeat_ngram_size": g.no_repeat_ngram_size,
        "repetition_guard": g.repetition_guard,
        "temperature_ladder": list(g.temperature_ladder),
        "max_attempts": g.max_attempts,
    }
