"""The README and docs/recipes.md run as written: every fenced block is executed or checked.

- ``console`` blocks: each ``$ command`` runs in a shared scratch folder (one per document,
  blocks in document order, so a file one block makes is there for the next). A command
  runs unless ``SKIP`` names it with a reason; a command that is not an ``mmpipe``,
  ``python`` or ``export`` line must be listed there, so a new block (``mmpipe serve``,
  say) is either made runnable or skipped on purpose, never silently.
- ``yaml`` blocks must parse; recipe-shaped ones (with ``nodes:``) are written to the
  scratch folder and checked by ``mmpipe validate``.
- ``python`` blocks: one whose first line is ``# NAME.py`` is saved as that file (a module
  for later blocks); any other is executed.
- ``mmpipe serve`` commands start a server in the background (kept until the document's
  blocks are done; it must answer ``/health`` before the next command), so the ``curl``
  and ``openai`` examples after them run against it. The README's ports are mapped to free
  ones, and ``curl`` gets ``--fail`` so that an HTTP error fails the test.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests import warm

pytestmark = pytest.mark.slow  # runs Whisper, Stable Diffusion (tiny) and servers as the README does

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/recipes.md")
BIN = Path(sys.executable).parent

# Commands that cannot run in a test, by their exact text (after `$ ` and line joins), and why.
SKIP: dict[str, str] = {
    "make run    # creates .venv if missing, installs with constraints.txt, runs the default recipe and prints its results":
        "installs into .venv; tests/integration/test_install.py covers a fresh install",
    "make test   # the same install, then the full test suite": "runs the whole suite, this test included",
    "mmpipe run sd_txt2img runtime=distributed runtime.nproc=2 placement.denoise=rank1:cuda:0 runtime.dtype=float16":
        "needs a CUDA device",
    "torchrun --nnodes=2 --nproc-per-node=1 --node-rank=$NODE_RANK --master-addr=HOST0 --master-port=29500 -m mmpipe run whisper_stt runtime=distributed":
        "two hosts",
    "torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 -m mmpipe run whisper_stt runtime=distributed      # add --rdzv-conf=is_host=1 on HOST0 if its name does not resolve to itself":
        "two hosts",
    "mmpipe run whisper_stt input=talks/ output_dir=out/talks        # Ctrl-C half way...":
        "needs a Ctrl-C half way; tests/integration/test_interrupts.py interrupts and resumes",
    "mmpipe serve whisper_stt model=base beam_size=1 --port 8003 # any override, as for `mmpipe run`":
        "a fourth server, with Whisper base (slow to load on these CPUs); no later example uses it",
}
# Commands that should run but fail today because of a bug elsewhere: the block stops there
# and xfails; once the bug is fixed the test fails until the entry is removed.
KNOWN_BUGS: dict[str, str] = {}
RUNNABLE = ("mmpipe ", "python ", "export ", "curl ")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The README's server ports -> free ones here (another test may hold 8000).
PORTS = {readme: _free_port() for readme in (8000, 8001, 8002, 8003)}


def localize(text: str) -> str:
    for readme, port in PORTS.items():
        text = re.sub(rf"\b{readme}\b", str(port), text)
    return text


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.lang}"


def blocks(doc: str) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the line each starts on."""
    out, lines = [], (ROOT / doc).read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m and m.group(1):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append(Block(doc, i + 1, m.group(1), "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return out


def commands(text: str) -> list[str]:
    """The ``$ `` commands of a console block, continuation lines joined."""
    prompted = any(raw.lstrip().startswith("$ ") for raw in text.splitlines())
    cmds: list[str] = []
    cont = False
    for raw in text.splitlines():
        line = raw.strip()
        if cont:
            cmds[-1] = cmds[-1][:-1].rstrip() + " " + line
        elif line.startswith("$ "):
            cmds.append(line[2:].strip())
        elif line and not line.startswith("#") and not prompted:
            cmds.append(line)  # a block of bare commands (no prompt): every line is one
        cont = line.endswith("\\")
    return cmds


ALL = [b for d in DOCS for b in blocks(d)]


def checked(block: Block) -> bool:
    """Whether test_block has anything to check in ``block``: not a ``text`` block (output
    shown to the reader), nor a console block whose every command is in SKIP. Such blocks
    are no test cases, so that none passes having checked nothing (test_every_block_is_known
    still sees them: their language, and that their SKIP entries exist)."""
    if block.lang == "text":
        return False
    return block.lang != "console" or any(cmd not in SKIP for cmd in commands(block.text))


CHECKED = [b for b in ALL if checked(b)]


def test_every_block_is_known():
    """Only languages this test knows how to check; and every skipped command still exists
    (a stale SKIP entry would hide nothing but mislead)."""
    assert {b.lang for b in ALL} <= {"console", "yaml", "python", "text"}, {b.lang for b in ALL}
    present = {c for b in ALL if b.lang == "console" for c in commands(b.text)}
    stale = (set(SKIP) | set(KNOWN_BUGS)) - present
    assert not stale, f"SKIP/KNOWN_BUGS name commands no document has: {stale}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A folder per document, with the inputs its commands name (talks/, talk.wav, clips/,
    list.jsonl, prompts.txt, recipes/examples/hello.wav)."""
    dirs: dict[str, Path] = {}
    for doc in DOCS:
        d = tmp_path_factory.mktemp(Path(doc).stem)
        (d / "talks").mkdir()
        (d / "recipes/examples").mkdir(parents=True)  # the README's paths, as from the repo root
        shutil.copy(ROOT / "recipes/examples/hello.wav", d / "recipes/examples/hello.wav")
        shutil.copy(ROOT / "recipes/examples/hello.wav", d / "talks" / "hello.wav")
        (d / "prompts.txt").write_text("a red bicycle\na lighthouse at dusk\n")
        shutil.copy(ROOT / "recipes/examples/hello.wav", d / "talk.wav")
        shutil.copytree(ROOT / "tests/assets/speech", d / "clips", ignore=shutil.ignore_patterns("*.sh", "*.md", "stereo*"))
        (d / "list.jsonl").write_text('{"audio": "talk.wav", "language": "en"}\n'
                                      '{"audio": "clips/clip1.wav", "id": "c1", "language": "de", "task": "translate"}\n')
        dirs[doc] = d
    yield dirs
    for proc in SERVERS:  # SIGTERM: the server drains and exits
        proc.terminate()
    for proc in SERVERS:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    SERVERS.clear()


SERVERS: list[subprocess.Popen[bytes]] = []


def serve(cmd: str, cwd: Path) -> None:
    """Start ``mmpipe serve ...`` in the background and wait until it answers /health."""
    port = int(re.search(r"--port (\d+)", cmd).group(1))  # type: ignore[union-attr]
    log = open(cwd / f"serve-{port}.log", "wb")
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=cwd, env=env_for(cwd), stdout=log, stderr=subprocess.STDOUT)
    SERVERS.append(proc)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`{cmd}` exited {proc.returncode}:\n{(cwd / log.name).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"`{cmd}` did not answer /health within 240 s:\n{(cwd / log.name).read_text()[-3000:]}")


def env_for(cwd: Path) -> dict[str, str]:
    """The commands' environment: this venv's ``mmpipe`` (warm-started, see tests/warm.py)."""
    first = [d for d in (warm.bin_dir(), str(BIN)) if d]
    env = dict(os.environ, PATH=os.pathsep.join([*first, os.environ.get("PATH", "")]), PYTHONPATH=str(cwd))
    env.pop("NODE_RANK", None)
    return env


def sh(script: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-ec", script], cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("block", CHECKED, ids=[b.id for b in CHECKED])
def test_block(block: Block, scratch: dict[str, Path]) -> None:
    cwd = scratch[block.doc]
    if block.lang == "yaml":
        data = yaml.safe_load(block.text)
        if isinstance(data, dict) and "nodes" in data:
            first = block.text.splitlines()[0]
            m = re.match(r"#\s*mmpipe run (\S+\.yaml)", first)
            name = m.group(1) if m else f"block_{block.line}.yaml"
            (cwd / name).write_text(block.text)
            r = sh(f"mmpipe validate {name}", cwd)
            assert r.returncode == 0, f"{block.id}: {r.stdout}\n{r.stderr}"
        return
    if block.lang == "python":
        m = re.match(r"#\s*(\w+\.py)\b", block.text)
        if m:
            (cwd / m.group(1)).write_text(block.text)
            r = subprocess.run([sys.executable, "-c", f"import {m.group(1)[:-3]}"], cwd=cwd, env=env_for(cwd), capture_output=True, text=True)
        else:
            r = subprocess.run([sys.executable, "-c", localize(block.text)], cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{block.id}: {r.stderr}"
        return
    for cmd in commands(block.text):
        if cmd in SKIP:
            continue
        assert cmd.startswith(RUNNABLE), f"{block.id}: make `{cmd}` runnable here or add it to SKIP with a reason"
        if cmd.startswith("mmpipe serve "):
            serve(localize(cmd), cwd)
            continue
        run = localize(cmd)
        if run.startswith("curl "):
            run = "curl --fail " + run[len("curl "):]
        r = sh(run, cwd)
        if cmd in KNOWN_BUGS:
            assert r.returncode != 0, f"`{cmd}` runs now: remove it from KNOWN_BUGS"
            pytest.xfail(KNOWN_BUGS[cmd])
        assert r.returncode == 0, f"{block.id}: `{cmd}` exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
