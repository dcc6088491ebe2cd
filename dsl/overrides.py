"""Command-line overrides: Hydra's grammar made forgiving, and its errors explained.

Free-text values (prompts, paths) are quoted for Hydra when the recipe gives that
key a string, so ``prompt="a cat, oil painting"`` works as a shell user types it;
schema keys take ``key=value`` without a ``+``; ``-m`` sweeps expand here (glob()
over config groups included); Hydra's own errors become one problem each, with
the quoting or spelling that works.
"""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from mmpipe.dsl.errors import Problem, RecipeError, Where, did_you_mean


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def yaml_leaves(text: str) -> Iterator[tuple[str, Any]]:
    """(key path, value) of every value under mappings of a YAML text (not the mappings)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return

    def walk(d: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(d, dict):
            for k, v in d.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if isinstance(v, dict):
                    yield from walk(v, key)
                else:
                    yield key, v

    yield from walk(data, "")


def _hydra_problem(exc: Exception, overrides: list[str], path: Path) -> Problem:
    """One of Hydra's errors as a problem: the override it is about, and a fix."""
    msg = str(exc).strip()
    first = msg.splitlines()[0] if msg else type(exc).__name__
    bare = next((o for o in overrides if "=" not in o and not o.startswith("~")), None)
    if bare is not None:  # e.g. a path with a space the shell cut in two
        return Problem("", f"'{bare}' is not an override (key=value)",
                       "if it belongs to the value before it, quote the whole override as one shell word, "
                       "e.g. 'input=/path/with space.wav'; otherwise write key=value", Where(override=bare))
    where = Where(file=_display(path))
    bad = None
    for o in overrides:
        k = o.lstrip("+~").split("=", 1)[0]
        if any(s in msg for s in (f"'{k}'", f"'{o}'", f"{k}=", f"'{k.split('.')[-1]}'")):
            where, bad = Where(override=o), o
            break
    from mmpipe.dsl.load import yaml_lines

    known = list(yaml_lines(path.read_text()))
    fix = ""
    if any(s in msg for s in ("LexerNoViableAlt", "no viable alternative", "mismatched input", "token recognition error", "extraneous input")):
        o = bad or next((x for x in overrides if x in msg), overrides[-1] if overrides else "")
        where = Where(override=o)
        key, _, value = o.partition("=")
        if not key.lstrip("+~").isascii():
            fix = f"keys are plain ASCII names: check '{key}' (did a non-ASCII character slip in?)"
        else:
            quoted = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            fix = f"Hydra's grammar cannot read that value unquoted: write {key}={quoted} (in a shell: \"{key}={quoted}\")"
    elif "Ambiguous value" in msg:
        o = bad or next((x for x in overrides if "," in x), "")
        where = Where(override=o)
        key, _, value = o.partition("=")
        fix = f"a comma makes a list of values to sweep: run with -m to try each, or quote it as one value: \"{key.lstrip('+')}='{value}'\""
    elif bad and ("Could not override" in msg or "No match in config" in msg or "not in struct" in msg):
        key = bad.split("=", 1)[0]
        hint = did_you_mean(key, known)
        add = f"add a new key with +{bad.lstrip('+')}"
        fix = f"{hint} (or {add})" if hint else f"'{key}' is not in the recipe: {add}, or check the spelling"
    elif "Could not find" in msg:
        fix = "check the option name against the files in that config group (`mmpipe ls` lists recipes)"
    elif "Could not delete" in msg:
        hint = did_you_mean(bad.lstrip("~").split("=")[0], known) if bad else ""
        fix = hint or "only keys that exist can be deleted with ~key"
    elif "Could not append" in msg or "already" in msg:
        fix = "the key exists: set it without '+' (key=value), or force with ++key=value"
    return Problem("", first, fix, where)


# Top-level schema keys every recipe has (with defaults) even when its file
# does not spell them out: ``output_dir=x`` must work without a '+'.
_SCHEMA_SCALARS = ("output_dir", "trace", "seed", "description", "allow_targets", "resume", "overwrite", "profile")
_SCHEMA_MAPS = ("placement", "batching", "runtime", "balance")
# Keys every node has (with defaults) even when the recipe does not spell them out.
_NODE_KEYS = ("split", "replicas", "with_previous")


_PLAIN = re.compile(r"^[A-Za-z0-9_\-./:@+*%?|$ ]*$")
_INTERP = re.compile(r"^\$\{[^}]*\}$")


def text_keys(path: Path) -> set[str]:
    """Key paths the recipe file gives a string (or null) value: free text such as
    prompts, paths and names, which overrides may give as a shell user types them."""
    out = {"output_dir", "trace", "description", "name", "profile"}
    out.update(k for k, v in yaml_leaves(path.read_text()) if v is None or isinstance(v, str))
    return out


def quote_free_text(o: str, keys: set[str]) -> str:
    """``prompt=it's a cat, oil painting`` -> ``prompt='it\\'s a cat, oil painting'``: Hydra's
    grammar reads commas, quotes and brackets; a free-text value is quoted for it."""
    if o.startswith("~") or "=" not in o:
        return o
    key, value = o.split("=", 1)
    if key.lstrip("+") not in keys or value in ("", "null") or _PLAIN.match(value) or _INTERP.match(value):
        return o
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return o  # already quoted for Hydra
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _schema_override(o: str) -> str:
    """Rewrite ``key=value`` on a schema key to Hydra's add-or-set ``++key=value``."""
    if o.startswith(("+", "~")) or "=" not in o:
        return o
    key = o.split("=", 1)[0]
    root = key.split(".", 1)[0]
    if key in _SCHEMA_SCALARS or (root in _SCHEMA_MAPS and "." in key):
        return "++" + o
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "nodes" and parts[2] in _NODE_KEYS:
        return "++" + o
    return o


def _references(text: str) -> dict[str, str]:
    """Key path -> variable, for every value that is exactly ``${variable}``."""
    return {k: v[2:-1].strip() for k, v in yaml_leaves(text) if isinstance(v, str) and _INTERP.match(v) and ":" not in v}


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra ``-m`` semantics: the cartesian product of every swept override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise RecipeError([Problem("", str(exc).splitlines()[0], "check the override syntax (key=value, +key=value, ~key, key=a,b)", Where(override=" ".join(overrides)))]) from exc
    axes: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            prefix = o.get_key_element()
            if type(o.value()).__name__ == "Glob":  # glob(*) over a config group's options
                group = o.key_or_group
                from mmpipe.dsl.load import recipes_dir

                opts = sorted(q.stem for q in (recipes_dir() / group).glob("*.yaml"))
                if not opts:
                    raise RecipeError([Problem(group, f"glob() sweeps the options of a config group, and '{group}' is none",
                                               f"config groups: {', '.join(sorted(p.name for p in recipes_dir().iterdir() if p.is_dir()))}",
                                               Where(override=o.input_line))])
                glob: Any = o.value()
                axes.append([f"{prefix}={v}" for v in glob.filter(opts)])
            else:
                axes.append([f"{prefix}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([str(o.input_line)])
    return [list(combo) for combo in itertools.product(*axes)]
