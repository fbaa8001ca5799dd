"""One training stage on Ray Train: `TorchTrainer` workers (DDP, or FSDP on GPUs), Ray Data input, Ray Train
checkpoints for resuming, and the official-layout checkpoint as the stage's output.

Driver (`run_stage`): reads the manifests into a Ray Data dataset, starts the trainer, and when it finishes copies the
last checkpoint's official files to `output`. Workers (`train_loop_per_worker`): load the previous stage's
checkpoint strictly (`load_pretrained`), interpolate the ViT position embedding to the stage's size, apply the
stage's freeze policy, and run AdamW with warm-up + cosine. Every `checkpoint_every` steps rank 0 reports a Ray Train
checkpoint holding the official-layout model plus `train_state.pt` (optimizer, scheduler, step, loss history): a
killed worker is restarted by `FailureConfig(max_failures)` and continues from it, and a killed driver rerun with the
same `--run-name` and `--storage` continues from it too (Ray Train restores a run by name and storage path).
Resuming restarts the data stream from its beginning (the step count and schedule continue).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .stages import StageSpec

log = logging.getLogger(__name__)
OFFICIAL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer", "training.json")


@dataclass
class RunSpec:
    """Everything a worker needs (pickled to it)."""

    spec: StageSpec
    init: str  # official-layout checkpoint this stage starts from
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    threads: int = 0  # torch threads per worker; 0 = leave torch's default
    strategy: str = "ddp"  # "ddp" | "fsdp"
    fail_at_step: int | None = None  # tests: the first attempt's worker exits at this step (fault injection)
    fail_marker: str | None = None  # file created when the fault fired, so the retry does not fire it again
    history: list = field(default_factory=list)
    words: list[str] = field(default_factory=list)  # the words objective's word list (from the training manifests)
    eval_data: list[str] = field(default_factory=list)  # held-out manifests for the diagnostics (training/diagnostics)
    eval_n: int = 32  # held-out examples the diagnostics use
    diag_every: int = 100  # steps between diagnostics (also at the first and last step)


def lr_at(step: int, spec: StageSpec) -> float:
    """Linear warm-up to `lr`, then cosine to `min_lr` at `steps` (step counts optimizer steps, from 0)."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = min(1.0, (step - spec.warmup) / max(1, spec.steps - spec.warmup))
    return spec.min_lr + 0.5 * (spec.lr - spec.min_lr) * (1 + math.cos(math.pi * t))


class LossModule:
    """Built lazily in the worker (torch imported there): wraps the model, and the word head of the ViT pretraining,
    so DDP/FSDP see one forward per step."""

    @staticmethod
    def make(model, spec: StageSpec, words: list[str]):
        import torch.nn as nn

        from .modeling import WordHead, batch_loss, text_loss, words_loss

        class _Loss(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.head = WordHead(words, inner.config.vision.embed_dim) if spec.objective == "words" else None

            def forward(self, examples):
                if spec.objective == "words":
                    return words_loss(self.inner, self.head, examples)
                if spec.objective == "text":
                    return text_loss(self.inner, examples)
                return batch_loss(self.inner, examples, spec.train_vision)

        if spec.objective == "words" and not words:
            raise ValueError("the words objective needs the corpus's word list (RunSpec.words)")
        return _Loss(model)


def heldout_examples(run: RunSpec) -> list:
    """The diagnostics' held-out examples, decoded as training decodes them (empty without --eval-data)."""
    from pipelines.storage import S3Settings, Storage

    from .data import DecodeExamples, read_manifest_rows

    if not run.eval_data:
        return [], None
    storage = Storage(S3Settings.from_env())
    rows = [r for m in run.eval_data for r in read_manifest_rows(m, storage)][: run.eval_n]
    decode = DecodeExamples(run.init, run.init, run.spec, S3Settings.from_env())
    from .data import examples_from_batch

    batch = decode({k: [r[k] for r in rows] for k in ("uri", "prompt", "answer")})
    return examples_from_batch(batch), decode.processor


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch

    from model.weights import load_pretrained

    from .data import examples_from_batch
    from .modeling import apply_freeze_policy, enable_gradient_checkpointing, resize_vision, save_checkpoint

    run: RunSpec = config["run"]
    spec = run.spec
    if run.threads:
        torch.set_num_threads(run.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(run.seed + rank)

    resume = ray.train.get_checkpoint()
    state = None
    if resume is not None:
        with resume.as_directory() as d:
            model = load_pretrained(d, strict=True)
            state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)
    else:
        model = resize_vision(load_pretrained(run.init, strict=True), spec.image_size)
    model.train()
    trained = apply_freeze_policy(model, spec)
    if spec.grad_checkpointing:
        enable_gradient_checkpointing(model)
    device = ray.train.torch.get_device()
    module = LossModule.make(model.to(device), spec, run.words)
    head = module.head
    if state is not None and state.get("head") is not None:
        head.load_state_dict(state["head"])
    if world > 1 or run.strategy == "fsdp":
        module = ray.train.torch.prepare_model(module, parallel_strategy=run.strategy, move_to_device=False)
    params = [p for p in module.parameters() if p.requires_grad]
    patch = {id(p) for p in model.vision.patch_embed.parameters()}
    groups = {}  # (weight decay, LR multiplier) -> params; no decay on norms, biases, gates (usual AdamW practice)
    for p in params:
        key = (spec.weight_decay if p.ndim >= 2 else 0.0, spec.patch_lr_mult if id(p) in patch else 1.0)
        groups.setdefault(key, []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": wd, "lr_mult": m} for (wd, m), ps in groups.items()],
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.eps,
    )
    step, history = 0, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
    per_worker = max(1, spec.batch // world // spec.grad_accum)
    shard = ray.train.get_dataset_shard("train")
    t0, tokens, losses = time.perf_counter(), 0, []
    heldout, processor = heldout_examples(run) if rank == 0 and run.eval_data else ([], None)

    def diagnostics() -> dict:
        from .diagnostics import diagnose

        if not heldout:
            return {}
        d = diagnose(model, heldout, spec.objective, head=head, processor=processor)
        log.info("stage %s step %d diagnostics %s", spec.stage, step, json.dumps(d))
        return d

    if state is None and heldout:
        history.append({"step": 0, "stage": spec.stage, "time": time.time(), **diagnostics()})

    def report(final: bool = False):
        metrics = {
            "step": step,
            "progress": step / spec.steps,
            "loss": sum(losses) / max(1, len(losses)),
            "tokens_per_s": tokens * world / max(1e-9, time.perf_counter() - t0),
            "lr": lr_at(step, spec),
            "stage": spec.stage,
        }
        if step % run.diag_every == 0 or final:
            metrics.update(diagnostics())
        history.append({**metrics, "time": time.time()})
        due = step % run.checkpoint_every == 0 or final
        full = full_model(module, model, run.strategy) if due else None  # FSDP: a collective, every rank joins
        if due and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(full, d, run.init, extra={"stage": dataclasses.asdict(spec), "step": step})
                torch.save(
                    {
                        "optimizer": opt.state_dict(),
                        "step": step,
                        "history": history,
                        "head": head.state_dict() if head is not None else None,
                    },
                    Path(d) / "train_state.pt",
                )
                (Path(d) / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        log.info(
            "stage %s step %d/%d loss %.4f %.0f tok/s",
            spec.stage,
            step,
            spec.steps,
            metrics["loss"],
            metrics["tokens_per_s"],
        )

    log.info("rank %d/%d: stage %s, %d trained tensors, from step %d", rank, world, spec.name, len(trained), step)
    while step < spec.steps:
        for batch in shard.iter_batches(
            batch_size=per_worker, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=4 * per_worker
        ):
            if step >= spec.steps:
                break
            if run.fail_at_step is not None and step == run.fail_at_step and not os.path.exists(run.fail_marker):
                Path(run.fail_marker).write_text(f"worker {rank} killed itself at step {step}\n")
                os._exit(1)  # a hard worker death, as a lost node: no cleanup, no exception
            for g in opt.param_groups:
                g["lr"] = lr_at(step, spec) * g["lr_mult"]
            loss, n = module(examples_from_batch(batch))
            (loss / spec.grad_accum).backward()
            tokens += n
            losses.append(float(loss.detach()))
            # Gradient accumulation: one optimizer step every grad_accum micro-batches.
            if len(losses) % spec.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(params, spec.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % run.log_every == 0 or step % run.checkpoint_every == 0 or step == spec.steps:
                report(final=step == spec.steps)
                t0, tokens, losses = time.perf_counter(), 0, []


def full_model(module, model, strategy: str):
    """The whole model on rank 0 for writing a checkpoint. DDP: every rank holds it already. FSDP: gather the full
    state dict (every rank must call this; only rank 0 gets the tensors) into a CPU copy.
    The FSDP path is written for GPU clusters and was not run on this CPU-only machine."""
    if strategy != "fsdp":
        return model
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from model.infimm import InfiMMHD

    with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(True, True)):
        state = module.state_dict()
    if not state:  # not rank 0
        return None
    copy = InfiMMHD(model.config)
    copy.load_state_dict({k.removeprefix("inner."): v for k, v in state.items()}, strict=True)
    return copy


def run_stage(
    run: RunSpec,
    manifests: list[str],
    output: str | Path,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    storage: str | None = None,
    run_name: str | None = None,
    max_failures: int = 2,
) -> dict:
    """Train one stage; write its official-layout checkpoint to `output`; return the final metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .data import build_dataset

    output = Path(output)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the trainer reports progress; keep logs readable
    ds = build_dataset(manifests, run.init, run.init, run.spec, run.seed)
    if run.spec.objective == "words" and not run.words:
        from pipelines.storage import S3Settings, Storage

        from .data import read_manifest_rows
        from .modeling import corpus_words

        store = Storage(S3Settings.from_env())
        run = dataclasses.replace(
            run, words=corpus_words(r["answer"] for m in manifests for r in read_manifest_rows(m, store))
        )
    storage = storage or str(output.parent / ".ray-train")
    name = run_name or f"{output.name}-stage{run.spec.stage}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": run},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage).resolve()) if "://" not in storage else storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {run.spec.stage} ended without a checkpoint: {result.error}")
    output.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for name_ in (*OFFICIAL_FILES, "history.jsonl"):
            src = Path(d) / name_
            if src.is_dir():
                shutil.copytree(src, output / name_, dirs_exist_ok=True)
            elif src.exists():
                shutil.copy2(src, output / name_)
    return dict(result.metrics or {})
