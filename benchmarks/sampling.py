"""Cost of the batched logits pipeline per decode step (`BatchSampler.sample`), per feature, at the real vocabulary.

    python -m benchmarks.sampling --slots 32 --vocab 32002 --device cpu --steps 50

Prints JSON: milliseconds per step for B rows that all use one setting (and "mixed": one row of each). No model runs:
random logits stand in for the lm_head output, so this isolates what sampling adds to a step. The JSON-schema mask is
left out here: its cost depends on the real tokenizer (llguidance computes it on the host per row).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model.sampling import BatchSampler, SamplingParams


class _Pieces:
    """Stands in for a tokenizer: logprobs only need a piece name per id."""

    def convert_ids_to_tokens(self, token: int) -> str:
        return f"\u2581t{token}"


SETTINGS = {
    "default_greedy": {},
    "default_sampled": {"temperature": 0.8, "top_p": 0.95, "seed": 0},
    "frequency_presence": {"frequency_penalty": 0.5, "presence_penalty": 0.5},
    "repetition_penalty": {"repetition_penalty": 1.2},
    "logit_bias": {"logit_bias": {i: 1.0 for i in range(0, 300, 3)}},
    "no_repeat_ngram_3": {"no_repeat_ngram_size": 3},
    "repetition_guard": {"repetition_guard": True},
    "logprobs_top5": {"logprobs": True, "top_logprobs": 5},
}


def time_setting(args, rows: list[SamplingParams]) -> float:
    dev = torch.device(args.device)
    sampler = BatchSampler(args.slots, args.vocab, dev, _Pieces(), (2,))
    states = [sampler.new_state(p) for p in rows]
    slots = list(range(len(rows)))
    prompt = list(range(100, 400))
    for slot, s in enumerate(states):
        sampler.admit(slot, s, prompt)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = [torch.randn(len(rows), args.vocab, device=dev, generator=g) for _ in range(8)]
    for i in range(5):  # warm-up
        sampler.sample(logits[i % 8], slots, states)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for i in range(args.steps):
        sampler.sample(logits[i % 8], slots, states)  # returns host ints: every step ends synchronised
    return (time.perf_counter() - t0) / args.steps * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32002)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2)) if args.device == "cpu" else None
    ms = {name: time_setting(args, [SamplingParams(**kw)] * args.slots) for name, kw in SETTINGS.items()}
    ms["mixed_one_row_each"] = time_setting(args, [SamplingParams(**kw) for kw in SETTINGS.values()])
    out = {"slots": args.slots, "vocab": args.vocab, "device": args.device, "ms_per_step": ms}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
