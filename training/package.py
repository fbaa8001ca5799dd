"""Assemble a shippable checkpoint from a recipe's stage outputs: the last stage's official-layout files, the loss
history of every stage in one `training_curve.jsonl`, and `training.json` with each stage's settings.

    python -m training.package WORKDIR DEST --stages s1-pt,s2-cpt,s3-dra,s4-ift
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .loop import OFFICIAL_FILES


def package(workdir: Path, dest: Path, stages: list[str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    last = workdir / stages[-1]
    for name in OFFICIAL_FILES:
        src = last / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        elif src.exists() and name != "training.json":
            shutil.copy2(src, dest / name)
    curve, record = [], []
    for stage in stages:
        history = [json.loads(line) for line in (workdir / stage / "history.jsonl").read_text().splitlines()]
        curve += history
        info = json.loads((workdir / stage / "training.json").read_text())
        record.append({"output": stage, **info, "final_loss": history[-1]["loss"]})
    (dest / "training_curve.jsonl").write_text("".join(json.dumps(h) + "\n" for h in curve))
    (dest / "training.json").write_text(json.dumps({"stages": record}, indent=2))
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.package", description=__doc__.split("\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--stages", default="s1-pt,s2-cpt,s3-dra,s4-ift")
    a = p.parse_args(argv)
    print(package(a.workdir, a.dest, a.stages.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
