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


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """`path` if given; else the default checkpoint, with its banner on stderr."""
    if path:
        return Path(path)
    print(RANDOM_BANNER, file=sys.stderr)
    return default_tiny_checkpoint()
