"""Training data: manifests of (image uri, prompt, answer) -> a Ray Data dataset of decoded, tokenized examples.

Manifests are `.jsonl`, `.csv` or `.parquet`, local or `s3://` (columns `uri`, `prompt`, `answer`; others ignored;
relative local uris resolve against the manifest's folder), read with the batch job's `Storage`. Pages go through
the batch job's decoding (`pipelines.decode.open_document`, then `model.windows.cut_views` with the stage's window
settings), so training sees exactly the views serving will; a PDF's first page is used.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from model.windows import WindowConfig, cut_views
from pipelines.storage import S3Settings, Storage

from .stages import StageSpec

COLUMNS = ("uri", "prompt", "answer")


def stage_windows(spec: StageSpec) -> WindowConfig:
    """Dynamic stages: windows + thumbnail (a 1x1 grid keeps its thumbnail); others: the page as one view."""
    if spec.dynamic:
        return WindowConfig(window=spec.image_size, max_windows=spec.max_windows, max_side=spec.image_size * 8)
    return WindowConfig(window=spec.image_size, max_windows=1, max_side=spec.image_size, single_window_thumbnail=False)


def read_manifest_rows(uri: str, storage: Storage) -> list[dict]:
    """All (uri, prompt, answer) rows of a manifest; raises ValueError naming what is missing."""
    data = storage.read(uri)
    suffix = uri.lower().rsplit(".", 1)[-1]
    if suffix == "jsonl":
        table = pajson.read_json(io.BytesIO(data))
    elif suffix == "csv":
        opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS})
        table = pacsv.read_csv(io.BytesIO(data), convert_options=opts)
    elif suffix == "parquet":
        table = pq.read_table(io.BytesIO(data))
    else:
        raise ValueError(f"training manifest {uri} must end in .jsonl, .csv or .parquet")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"training manifest {uri} lacks columns {missing} (has {table.column_names})")
    base = None if "://" in uri else Path(uri).resolve().parent
    rows = []
    for i, r in enumerate(table.select(list(COLUMNS)).to_pylist()):
        if not r["uri"] or r["answer"] is None or r["prompt"] is None:
            raise ValueError(f"training manifest {uri} row {i}: uri, prompt and answer are all required")
        u = r["uri"]
        if base is not None and "://" not in u and not Path(u).is_absolute():
            u = str(base / u)
        rows.append({"uri": u, "prompt": str(r["prompt"]), "answer": str(r["answer"])})
    if not rows:
        raise ValueError(f"training manifest {uri} has no rows")
    return rows


class DecodeExamples:
    """Ray Data map_batches callable: manifest rows -> views (uint8 bytes) + token ids + answer-only labels."""

    def __init__(self, tokenizer_dir: str, config_dir: str, spec: StageSpec, s3: S3Settings = S3Settings()):
        from model.config import InfiMMHDConfig
        from model.processor import Processor
        from model.tokenizer import load_tokenizer

        self.spec = spec
        self.windows = stage_windows(spec)
        self.storage = Storage(s3)
        cfg = InfiMMHDConfig.from_pretrained(config_dir)
        self.processor = Processor(load_tokenizer(tokenizer_dir), cfg, self.windows)

    def example(self, uri: str, prompt: str, answer: str) -> dict:
        from pipelines.decode import DecodeConfig, open_document

        from .modeling import encode_example

        ids, labels = encode_example(self.processor, prompt, answer, self.spec.max_text_len)
        if self.spec.objective == "text":  # language-model pretraining reads no page
            return {
                **dict.fromkeys(("n_views", "size", "rows", "cols"), 0),
                "views": b"",
                "answer": answer,
                "input_ids": np.asarray(ids, dtype=np.int64),
                "labels": np.asarray(labels, dtype=np.int64),
            }
        data = self.storage.read(uri)
        doc = open_document(data, uri, DecodeConfig(windows=self.windows))
        try:
            page = cut_views(doc.page(0), self.windows)
        finally:
            doc.close()
        v = page.views.numpy()  # (V, 3, S, S) uint8
        return {
            "answer": answer,
            "views": v.tobytes(),
            "n_views": v.shape[0],
            "size": v.shape[-1],
            "rows": page.rows,
            "cols": page.cols,
            "input_ids": np.asarray(ids, dtype=np.int64),
            "labels": np.asarray(labels, dtype=np.int64),
        }

    def __call__(self, batch: dict) -> dict:
        out = [self.example(u, p, a) for u, p, a in zip(batch["uri"], batch["prompt"], batch["answer"], strict=True)]
        return {k: [o[k] for o in out] for k in out[0]}


def examples_from_batch(batch: dict) -> list:
    """A batch from `iter_batches(batch_format="numpy")` -> modeling.Example list."""
    import torch

    from .modeling import Example

    out = []
    for i in range(len(batch["n_views"])):
        v, s = int(batch["n_views"][i]), int(batch["size"][i])
        if v == 0:  # the text objective decodes no page
            views = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        else:
            views = torch.frombuffer(bytearray(batch["views"][i]), dtype=torch.uint8).view(v, 3, s, s)
        out.append(
            Example(
                input_ids=[int(x) for x in batch["input_ids"][i]],
                labels=[int(x) for x in batch["labels"][i]],
                views=views,
                rows=int(batch["rows"][i]),
                cols=int(batch["cols"][i]),
                answer=str(batch["answer"][i]) if "answer" in batch else "",
            )
        )
    return out


def build_dataset(manifests: list[str], tokenizer_dir: str, config_dir: str, spec: StageSpec, seed: int, s3=None):
    """Ray Data dataset of decoded examples from one or more manifests (rows shuffled once, seeded; the workers
    shuffle further in a local buffer)."""
    import ray

    s3 = s3 or S3Settings.from_env()
    storage = Storage(s3)
    rows = [r for m in manifests for r in read_manifest_rows(m, storage)]
    # Shuffled here, not with Dataset.random_shuffle: its all-to-all tasks want a whole CPU each, which a small
    # cluster whose cores the trainer holds never frees (the stage then waits forever).
    random.Random(seed).shuffle(rows)
    return ray.data.from_items(rows).map_batches(
        DecodeExamples,
        fn_constructor_args=(tokenizer_dir, config_dir, spec, s3),
        batch_size=16,
        concurrency=1,
        num_cpus=0.5,
    )
