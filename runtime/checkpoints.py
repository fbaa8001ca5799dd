"""Which checkpoint a command uses when none is given, and the banner that says what it is."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

RANDOM_BANNER = (
    "=" * 78 + "\n"
    "  WARNING: no --checkpoint given: using a TINY checkpoint with RANDOM WEIGHTS built on the spot.\n"
    "  Everything works end to end, but the generated text is noise. Pass --checkpoint DIR for real output.\n"
    + "="
    * 78
)


def default_tiny_checkpoint(seed: int = 0, folder: str | os.PathLike | None = None) -> Path:
    """A tiny random checkpoint, built once per machine and reused: in `folder`, else $INFIMM_TINY_CHECKPOINT, else
    the temp folder. Built into a sibling and renamed, so concurrent callers never see half of one."""
    from model.weights import make_tiny_checkpoint

    folder = folder or os.environ.get("INFIMM_TINY_CHECKPOINT")
    folder = Path(folder) if folder else Path(tempfile.gettempdir()) / f"infimm-hd-tiny-random-{seed}"
    if not (folder / "config.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_tiny_checkpoint(tmp, seed=seed)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# The demo reader (checkpoints/demo-reader/, docs/training.md): a tiny model trained by training/demo_recipe.sh.
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-reader"
DEMO_PROMPT = "What word is printed on this page?"
# The demo reader replaces the random tiny checkpoint as the default only if it reads: its measured exact match on
# held-out pages through the batch job (eval.json, written by benchmarks/train_eval.py) must reach this.
DEMO_MIN_EXACT = 0.5


def demo_eval(folder: Path | None = None) -> dict:
    """The demo reader's measured figures through the batch job ({} when it has not been measured)."""
    import json

    file = (folder or DEMO_CHECKPOINT) / "eval.json"
    return json.loads(file.read_text()).get("batch_job") or {} if file.exists() else {}


def demo_banner(folder: Path | None = None) -> str:
    e = demo_eval(folder)
    facts = f" (held-out: CER {e['cer']:.2f}, exact match {e['exact_match']:.2f})" if e else ""
    return (
        "=" * 78 + "\n"
        "  NOTE: no --checkpoint given: using the DEMO READER, a ~1 M-parameter model trained by this repository's\n"
        "  recipe on SYNTHETIC pages. It is NOT InfiMM-HD's weights. It reads one printed word (of a closed list of\n"
        f"  97) on a 224 px page, asked {DEMO_PROMPT!r}{facts}.\n"
        "  Anything else gets guesses. Pass --checkpoint DIR for a real model, --random for random tiny weights.\n"
        + "="
        * 78
    )


def is_random_checkpoint(folder: str | os.PathLike) -> bool:
    from model.weights import is_random_checkpoint as random_marker

    return random_marker(folder)


def demo_checkpoint() -> Path | None:
    """The shipped demo reader, if this checkout has it (it is not part of a wheel) and it reads (DEMO_MIN_EXACT)."""
    if not (DEMO_CHECKPOINT / "config.json").exists():
        return None
    return DEMO_CHECKPOINT if demo_eval().get("exact_match", 0.0) >= DEMO_MIN_EXACT else None


def default_checkpoint(random: bool = False) -> Path:
    """The demo reader, or the tiny random checkpoint when asked for (`--random`) or when the demo is not here."""
    demo = None if random else demo_checkpoint()
    return demo or default_tiny_checkpoint()


def default_banner(random: bool = False) -> str:
    return demo_banner() if not random and demo_checkpoint() else RANDOM_BANNER


def resolve_checkpoint(path: str | os.PathLike | None, random: bool = False) -> Path:
    """`path` if given; else the default checkpoint (`default_checkpoint`), with its banner on stderr."""
    if path:
        return Path(path)
    print(default_banner(random), file=sys.stderr)
    return default_checkpoint(random)
