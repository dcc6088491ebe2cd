"""The corpus of bad recipes and overrides (``tests/bad/cases.yaml``).

Every case must exit 2 with no traceback, and its message must name where the
problem is (the file and line, or the override), the key path and a fix.
Cases run in-process through the CLI's ``main`` (``mmpipe validate``, or ``run``
where the check belongs to a run), so the whole corpus takes seconds.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmpipe.cli import main

CASES = yaml.safe_load((Path(__file__).parent / "bad" / "cases.yaml").read_text())
REPO = Path(__file__).resolve().parents[1]


def run_case(case: dict[str, Any], tmp: Path) -> tuple[int, str]:
    if "recipe" in case:
        recipe = tmp / f"{case['name']}.yaml"
        recipe.write_text(case["recipe"])
        target = str(recipe)
    else:
        target = case["shipped"]
    overrides = [o.replace("{repo}", str(REPO)) for o in case.get("overrides", [])]  # shipped files, from any cwd
    args = [case.get("command", "validate"), target, *overrides, f"output_dir={tmp}/out"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40 and len({c["name"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_case(case: dict[str, Any], tmp_path: Path) -> None:
    if case.get("skip_if_cuda"):
        import torch

        if torch.cuda.device_count() >= case["skip_if_cuda"]:
            pytest.skip("this machine has that device")
    code, err = run_case(case, tmp_path)
    assert code == 2, err
    assert "Traceback" not in err, err
    for fragment in case["expect"]:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "fix:" in err, err
    if "key" in case:
        assert f": {case['key']}: " in err, err
    where = case.get("where")
    if where:
        assert err.splitlines()[1].startswith(where) or f"\n{where}" in err, err
    elif "line" in case:
        assert f"{case['name']}.yaml:{case['line']}:" in err, err
    elif case.get("overrides"):
        assert "override '" in err or ".yaml:" in err, err
