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
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

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
}
# Commands that should run but fail today because of a bug elsewhere: the block stops there
# and xfails; once the bug is fixed the test fails until the entry is removed.
KNOWN_BUGS: dict[str, str] = {
    "mmpipe profile whisper_stt input=talks/ --chart        # -> outputs/whisper_stt/<date>/profile.json, profile.png":
        "runtime/profile.py nbytes() calls untyped_storage() on an opaque (MKLDNN) tensor of tiny_en: NotImplementedError",
}
RUNNABLE = ("mmpipe ", "python ", "export ")


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


def test_every_block_is_known():
    """Only languages this test knows how to check; and every skipped command still exists
    (a stale SKIP entry would hide nothing but mislead)."""
    assert {b.lang for b in ALL} <= {"console", "yaml", "python", "text"}, {b.lang for b in ALL}
    present = {c for b in ALL if b.lang == "console" for c in commands(b.text)}
    stale = (set(SKIP) | set(KNOWN_BUGS)) - present
    assert not stale, f"SKIP/KNOWN_BUGS name commands no document has: {stale}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder per document, with the inputs its commands name (talks/, prompts.txt,
    recipes/examples/hello.wav)."""
    dirs = {}
    for doc in DOCS:
        d = tmp_path_factory.mktemp(Path(doc).stem)
        (d / "talks").mkdir()
        (d / "recipes/examples").mkdir(parents=True)  # the README's paths, as from the repo root
        shutil.copy(ROOT / "recipes/examples/hello.wav", d / "recipes/examples/hello.wav")
        shutil.copy(ROOT / "recipes/examples/hello.wav", d / "talks" / "hello.wav")
        (d / "prompts.txt").write_text("a red bicycle\na lighthouse at dusk\n")
        dirs[doc] = d
    return dirs


def env_for(cwd: Path) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(cwd))
    env.pop("NODE_RANK", None)
    return env


def sh(script: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-ec", script], cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_block(block: Block, scratch: dict[str, Path]) -> None:
    cwd = scratch[block.doc]
    if block.lang == "text":
        return
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
            r = subprocess.run([sys.executable, "-c", block.text], cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{block.id}: {r.stderr}"
        return
    for cmd in commands(block.text):
        if cmd in SKIP:
            continue
        assert cmd.startswith(RUNNABLE), f"{block.id}: make `{cmd}` runnable here or add it to SKIP with a reason"
        r = sh(cmd, cwd)
        if cmd in KNOWN_BUGS:
            assert r.returncode != 0, f"`{cmd}` runs now: remove it from KNOWN_BUGS"
            pytest.xfail(KNOWN_BUGS[cmd])
        assert r.returncode == 0, f"{block.id}: `{cmd}` exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
