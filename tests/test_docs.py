"""Every example in README.md and docs/*.md runs, against a tiny random checkpoint on the CPU.

Which blocks run:
* every ```python block, always (a `not run` marker on one is a failure);
* every ```bash block, unless the line right above its fence is `<!-- not run: REASON -->` (HTML comments do not show
  on the site) with a reason: a GPU, a cluster, the official checkpoint, a server that runs until stopped, or a
  command another test already runs. Blocks of other languages (yaml, plain text) are not code and are not run.

The docs show the real deployment: an official checkpoint under /models, a CUDA device, a server on port 8000. Here
each is replaced by its local stand-in through the explicit tables `python_placeholders` / `BASH_PLACEHOLDERS` (plain
text substitution; every placeholder must still occur in some block, so the tables cannot go stale silently). Python
blocks run in a temporary folder that holds a generated `page.png`; the client block talks to the real HTTP layer
(`make_api(Frontend)` around the tiny engine, what the Serve ingress serves) on a free 127.0.0.1 port. Bash blocks run
with `bash -euo pipefail` in a temporary folder that holds `page.png`, with the local S3 (SeaweedFS) in AWS_* whose
bucket `scans` holds two pages under `2024/`, and with the default checkpoint built in that folder. A block that fails
reports its file and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import ROOT, free_port
from .docs_helpers import docs_hooks
from .serve_helpers import page_png

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```$", flags=re.M | re.S)
NOT_RUN = re.compile(r"^<!-- not run: (.*\S.*) -->$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    lang: str
    code: str
    not_run: str | None  # the reason given above the fence, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_blocks() -> list[Block]:
    blocks = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in FENCE.finditer(text):
            above = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = NOT_RUN.match(above)
            line = text.count("\n", 0, m.start(2)) + 1
            blocks.append(Block(path, line, m.group(1), m.group(2), marker.group(1) if marker else None))
    return blocks


BLOCKS = doc_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash" and b.not_run is None]


def python_placeholders(env) -> dict[str, str]:
    """Docs text -> what it stands for on this machine."""
    return {
        '"/models/infimm-hd-13b"': repr(str(env.checkpoint)),  # the official checkpoint -> the tiny random one
        'device="cuda"': 'device="cpu"',
        ".cuda()": "",  # tensors stay on the CPU
        "http://127.0.0.1:8000/v1": env.base + "/v1",  # `infimm-hd serve --port 8000` -> the in-process HTTP layer
    }


BASH_PLACEHOLDERS = {"/models/infimm-hd-13b": "{checkpoint}"}  # the official checkpoint -> the tiny random one


def test_every_block_is_run_or_says_why_not():
    assert len(PYTHON) >= 4 and len(BASH) >= 3, "the docs lost their runnable examples?"
    marked = [b.where for b in PYTHON if b.not_run is not None]
    assert not marked, f"every Python block runs; remove the not-run marker at {marked}"
    unmarked = [b.where for b in BLOCKS if b.lang not in ("python", "bash", "yaml", "text", "")]
    assert not unmarked, f"a fence language this test does not know (python and bash run, yaml/text do not): {unmarked}"
    stand_in = SimpleNamespace(checkpoint="x", base="x")
    python_code = "".join(b.code for b in PYTHON)
    missing = [k for k in python_placeholders(stand_in) if k not in python_code]
    missing += [k for k in BASH_PLACEHOLDERS if k not in "".join(b.code for b in BASH)]
    assert not missing, f"a placeholder names text no block contains any more: {missing}"


def test_generated_tables_render():
    hooks = docs_hooks()
    for path in DOC_FILES:
        rendered = hooks.render(path.read_text())  # an unknown name raises
        assert not hooks.MARKER.search(rendered), path
    batch = hooks.render((ROOT / "docs" / "batch.md").read_text())
    assert "| `--max-windows N` | 16 |" in batch and "| 3 | storage stayed unavailable" in batch


def test_readme_links_reach_docs_pages_and_headings():
    """The site build checks the links inside docs/; README.md is outside it, so its relative links are checked here."""
    from markdown.extensions.toc import slugify

    links = re.findall(r"\]\(([^)#\s]+\.md)(?:#([^)\s]+))?\)", (ROOT / "README.md").read_text())
    assert links, "README.md links no docs page?"
    for target, anchor in links:
        page = ROOT / target
        assert page.is_file(), f"README.md links {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
            assert anchor in {slugify(h, "-") for h in headings}, f"README.md links {target}#{anchor}: no such heading"


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory):
    from deployments.app import load_engine
    from deployments.config import ServeArgs
    from deployments.engine_server import EngineServer
    from deployments.frontend import Frontend, FrontendSettings, LocalModelClient, make_api
    from deployments.images import ImageFetcher, ImagePolicy

    from .serve_helpers import run_asgi

    folder = tmp_path_factory.mktemp("docs")
    (folder / "page.png").write_bytes(page_png())
    args = ServeArgs(checkpoint=str(tiny_checkpoint), device="cpu", max_slots=2)
    server = EngineServer(load_engine(args), args.limits)
    policy = ImagePolicy(args.limits.max_image_bytes, args.window_config())
    frontend = Frontend(LocalModelClient(server), ImageFetcher(policy), FrontendSettings(limits=args.limits))
    try:
        with run_asgi(make_api(frontend), free_port()) as base:
            yield SimpleNamespace(checkpoint=tiny_checkpoint, folder=folder, base=base)
    finally:
        server.shutdown()


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_runs(env, block, monkeypatch):
    monkeypatch.chdir(env.folder)
    monkeypatch.delenv("INFIMM_API_KEY", raising=False)  # the local server runs without a key
    code = block.code
    for text, local in python_placeholders(env).items():
        code = code.replace(text, local)
    # pad with newlines so that tracebacks point at the doc's own line numbers
    compiled = compile("\n" * (block.line - 1) + code, str(block.path), "exec")
    try:
        exec(compiled, {"__name__": "__docs__"})
    except Exception:  # noqa: BLE001 - any error in a docs example is the failure, reported with its line
        pytest.fail(f"{block.where} raised:\n{traceback.format_exc()}")


@pytest.fixture(scope="module")
def shell(tiny_checkpoint, s3_server, tmp_path_factory):
    """A folder with page.png, the local S3 holding s3://scans/2024/, and the environment the bash blocks run in."""
    from demo.samples import png_page

    folder = tmp_path_factory.mktemp("docs-bash")
    (folder / "page.png").write_bytes(page_png())
    for bucket in ("scans", "results"):
        s3_server.create_bucket(bucket)
    s3 = s3_server.client()
    for n in (1, 2):
        s3.put_object(Bucket="scans", Key=f"2024/page-{n}.png", Body=png_page(n, size=(448, 448)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `infimm-hd` script
    env["INFIMM_TINY_CHECKPOINT"] = str(folder / "default-tiny")  # what a fresh machine builds without --checkpoint
    env.pop("INFIMM_API_KEY", None)
    return SimpleNamespace(folder=folder, env=env, checkpoint=str(tiny_checkpoint))


@pytest.mark.timeout(700)
@pytest.mark.parametrize("block", BASH, ids=[b.where for b in BASH])
def test_bash_block_runs(shell, block):
    code = block.code
    for text, local in BASH_PLACEHOLDERS.items():
        code = code.replace(text, local.format(checkpoint=shell.checkpoint))
    p = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=shell.folder,
        env=shell.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, f"{block.where} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
