"""Every ```python block of README.md runs, against the tiny random checkpoint on the CPU.

The README shows the real deployment: an official checkpoint under /models, a CUDA device, a server on port 8000.
Here each of those is replaced by its local stand-in through the explicit table PLACEHOLDERS (plain text
substitution; a README placeholder the table names must still occur, so the table cannot go stale silently). Blocks
run in a temporary folder that holds a generated `page.png`; the client block talks to the real HTTP layer
(`make_api(Frontend)` around the tiny engine, what the Serve ingress serves) on a free 127.0.0.1 port. A block that
raises fails the test with the README line numbers in its traceback.
"""

from __future__ import annotations

import re
import traceback
from types import SimpleNamespace

import pytest

from .conftest import ROOT, free_port
from .serve_helpers import page_png, run_asgi

README = ROOT / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    """(line of the block's first code line, 1-based; code) for every ```python fence."""
    text = README.read_text()
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.M | re.S):
        blocks.append((text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return blocks


def placeholders(env) -> dict[str, str]:
    """README text -> what it stands for on this machine."""
    return {
        '"/models/infimm-hd-13b"': repr(str(env.checkpoint)),  # the official checkpoint -> the tiny random one
        'device="cuda"': 'device="cpu"',
        ".cuda()": "",  # tensors stay on the CPU
        "http://127.0.0.1:8000/v1": env.base + "/v1",  # `infimm-hd serve --port 8000` -> the in-process HTTP layer
    }


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory):
    from deployments.app import load_engine
    from deployments.config import ServeArgs
    from deployments.engine_server import EngineServer
    from deployments.frontend import Frontend, FrontendSettings, LocalModelClient, make_api
    from deployments.images import ImageFetcher, ImagePolicy

    folder = tmp_path_factory.mktemp("readme")
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


def test_readme_has_python_blocks_and_every_placeholder_occurs():
    code = "".join(c for _, c in python_blocks())
    assert len(python_blocks()) >= 3, "README lost its Python examples?"
    stand_in = SimpleNamespace(checkpoint="x", base="x")
    missing = [k for k in placeholders(stand_in) if k not in code]
    assert not missing, f"PLACEHOLDERS names text no README block contains any more: {missing}"


@pytest.mark.parametrize("line,code", python_blocks(), ids=[f"README.md:{n}" for n, _ in python_blocks()])
def test_readme_python_block_runs(env, line, code, monkeypatch):
    monkeypatch.chdir(env.folder)
    monkeypatch.delenv("INFIMM_API_KEY", raising=False)  # the local server runs without a key
    for text, local in placeholders(env).items():
        code = code.replace(text, local)
    # pad with newlines so that tracebacks point at README.md's own line numbers
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    try:
        exec(compiled, {"__name__": "__readme__"})
    except Exception:  # noqa: BLE001 - any error in a README example is the failure, reported with its README line
        pytest.fail(f"README.md block at line {line} raised:\n{traceback.format_exc()}")
