"""docs/kinds.md is generated from the kinds' declarations and must not go stale; every
shipped config field is documented, by its comment in the dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmpipe.describe import config_rows, field_docs, kind_reference
from mmpipe.graphs import get_kind, get_source, kind_names, source_names

ROOT = Path(__file__).resolve().parents[2]


def test_kinds_md_is_current():
    text = (ROOT / "docs/kinds.md").read_text()
    assert text == kind_reference(), "docs/kinds.md is stale: regenerate it with `make docs` (python -m mmpipe.describe > docs/kinds.md)"


def test_every_shipped_config_field_has_a_doc():
    missing = [f"{n}: {r[0]}" for n in kind_names() + source_names()
               for r in config_rows((get_kind(n) or get_source(n)).Config) if not r[3]]  # type: ignore[union-attr]
    assert not missing, f"document these fields with a comment on their line: {missing}"


@dataclass(kw_only=True)
class _Base:
    # above a field,
    # over two lines
    a: int = 1
    b: str = "x#y"  # trailing, after a '#' inside a string


@dataclass(kw_only=True)
class _Child(_Base):
    c: float = 0.5

    d: list[int] = field(default_factory=list, metadata={"doc": "from metadata"})


def test_field_docs_read_comments_and_metadata():
    assert field_docs(_Child) == {"a": "above a field, over two lines", "b": "trailing, after a '#' inside a string", "c": "", "d": ""}
    rows = {r[0]: r for r in config_rows(_Child)}
    assert rows["d"][3] == "from metadata" and rows["c"][3] == "" and rows["a"][2] == "1"
