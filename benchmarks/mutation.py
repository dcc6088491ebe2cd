"""Mutation testing of the core (``make mutation``): how many seeded bugs the tests catch.

    python benchmarks/mutation.py                      # every mutant (hours on 2 cores)
    python benchmarks/mutation.py --sample 150         # a seeded random sample per group
    python benchmarks/mutation.py --only runtime --sample 50
    python benchmarks/mutation.py --only dsl --only runtime --sample 15 --timeout 90 --keep build/mutation

cosmic-ray (PyPI) makes one small change at a time in a module (an operator, a
constant, a comparison, a removed call...), runs the tests that cover that
module, and records whether they failed ("killed") or passed ("survived"). Each
group pairs modules with the tests that exercise them, so a mutant runs only the
relevant tests. Prints the kill rate per group and every survivor (file:line and
the change), to be read: a survivor is either a missing test or an equivalent
mutant (a change no behaviour can show). Decides nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FAST = "env MMPIPE_HYPOTHESIS_EXAMPLES=15 MMPIPE_FUZZ_EXAMPLES=0.05"
GROUPS: dict[str, tuple[list[str], str]] = {
    "dsl": (["dsl"], f"{FAST} {PY} -m pytest -x -q -p no:cacheprovider tests/unit/dsl tests/test_bad_recipes.py"),
    "runtime": (["runtime"], f"{FAST} {PY} -m pytest -x -q -p no:cacheprovider tests/unit/runtime"),
    # The loop modules, each with only the tests that exercise it (the diffusion tests take a
    # minute per mutant; the Whisper ones a quarter of that).
    "whisper_loops": (["graphs/whisper_decode.py", "graphs/whisper_text.py"],
                      f"{FAST} {PY} -m pytest -x -q -p no:cacheprovider tests/unit/graphs/test_whisper_nodes.py tests/unit/graphs/test_whisper_stitch.py"),
    "diffusion_loop": (["graphs/diffusion_loop.py"],
                       f"{FAST} {PY} -m pytest -x -q -p no:cacheprovider tests/unit/graphs/test_diffusion_nodes.py"),
}
SKIP = ("runtime/dist_", "runtime/transfer.py")  # need several processes or a GPU: covered by integration tests, too slow per mutant


def config(modules: list[str], test: str, timeout: float) -> str:
    paths = [str(p) for m in modules for p in (sorted((ROOT / m).glob("*.py")) if (ROOT / m).is_dir() else [ROOT / m])
             if not any(s in str(p) for s in SKIP) and not p.name.startswith("__")]
    return "\n".join([
        "[cosmic-ray]",
        f"module-path = {json.dumps([os.path.relpath(p, ROOT) for p in paths])}",
        f"timeout = {timeout}",
        "excluded-modules = []",
        f"test-command = {json.dumps(test)}",
        "", "[cosmic-ray.distributor]", 'name = "local"', ""])


def sample(db: Path, n: int, seed: int) -> None:
    """Keep ``n`` random work items (the same ones for the same seed)."""
    con = sqlite3.connect(db)
    ids = [r[0] for r in con.execute("select job_id from work_items order by job_id")]
    keep = set(random.Random(seed).sample(ids, min(n, len(ids))))
    drop = [(i,) for i in ids if i not in keep]
    for table in ("mutation_specs", "work_items"):
        con.executemany(f"delete from {table} where job_id = ?", drop)
    con.commit()
    con.close()


def survivors(db: Path) -> tuple[int, int, list[str]]:
    con = sqlite3.connect(db)
    rows = con.execute(
        "select m.module_path, m.start_pos_row, m.operator_name, r.test_outcome, r.diff from work_results r "
        "join mutation_specs m on m.job_id = r.job_id").fetchall()
    con.close()
    done = [r for r in rows if str(r[3]).lower() in ("killed", "survived")]
    alive = [r for r in done if str(r[3]).lower() == "survived"]
    notes = [f"{path}:{row}  {op}\n" + "\n".join("      " + ln for ln in (diff or "").splitlines()[2:] if ln[:1] in "+-")
             for path, row, op, _, diff in sorted(alive)]
    return len(done), len(done) - len(alive), notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(GROUPS), action="append")
    ap.add_argument("--sample", type=int, default=0, help="random mutants per group (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's tests")
    ap.add_argument("--keep", help="folder for the session databases (to read them again)")
    a = ap.parse_args(argv)
    work = Path(a.keep or tempfile.mkdtemp(prefix="mmpipe-mutation-"))
    work.mkdir(parents=True, exist_ok=True)
    cr = str(Path(PY).parent / "cosmic-ray")
    total = [0, 0]
    for name in a.only or list(GROUPS):
        modules, test = GROUPS[name]
        toml, db = work / f"{name}.toml", work / f"{name}.sqlite"
        toml.write_text(config(modules, test, a.timeout))
        subprocess.run([cr, "init", str(toml), str(db)], cwd=ROOT, check=True, capture_output=True)
        if a.sample:
            sample(db, a.sample, a.seed)
        subprocess.run([cr, "exec", str(toml), str(db)], cwd=ROOT, check=True)
        n, killed, notes = survivors(db)
        total[0] += n
        total[1] += killed
        print(f"\n## {name}: {killed}/{n} mutants killed ({100 * killed / max(n, 1):.1f}%)" + (f", a sample of {a.sample}" if a.sample else ""))
        for note in notes:
            print("  survived: " + note)
    print(f"\nall groups: {total[1]}/{total[0]} killed ({100 * total[1] / max(total[0], 1):.1f}%); sessions in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
