"""Compose a recipe with Hydra and remember where every value came from.

``load_recipe(recipe, overrides)`` returns a ``Loaded``: the composed
``DictConfig`` plus a provenance map (key path -> file:line or override), so
that every later problem can point at the recipe line that caused it.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpipe.dsl.errors import Problem, RecipeError, Where, did_you_mean

RECIPES_PKG = "mmpipe.recipes"


def recipes_dir() -> Path:
    """The directory of the shipped recipes (works for editable and normal installs)."""
    import mmpipe.recipes

    return Path(mmpipe.recipes.__file__).resolve().parent


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every runnable recipe shipped in the package."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    """The ``description`` of a recipe file, read without composing it."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return "(unreadable YAML)"
    return str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""


def resolve_recipe(recipe: str) -> Path:
    """A recipe name from ``recipes/`` or a path to a .yaml file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or os.sep in recipe:
        if p.is_file():
            return p.resolve()
        raise RecipeError([Problem("", f"recipe file '{recipe}' not found", "give an existing .yaml path or a name from `mmpipe ls`", Where(override=recipe))])
    shipped = shipped_recipes()
    if recipe in shipped:
        return shipped[recipe]
    hint = did_you_mean(recipe, shipped)
    raise RecipeError([Problem("", f"unknown recipe '{recipe}'", hint or f"use one of: {', '.join(shipped)} (or a path to a .yaml)", Where(override=recipe))])


# --------------------------------------------------------------------- lines
def yaml_lines(text: str, prefix: str = "") -> dict[str, int]:
    """Key path -> 1-based line of every mapping key and list item in a YAML text."""
    out: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{path}.{k.value}" if path else str(k.value)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = f"{path}[{i}]"
                out[key] = v.start_mark.line + 1
                walk(v, key)

    walk(root, prefix)
    return out


def _package_of(text: str, group: str) -> str:
    for line in text.splitlines()[:5]:
        if line.strip().startswith("# @package"):
            pkg = line.split("@package", 1)[1].strip()
            return "" if pkg == "_global_" else pkg
    return group.replace("/", ".")


@dataclass
class Provenance:
    """Key path -> where the value was last set (later sources win)."""

    entries: dict[str, Where] = field(default_factory=dict)
    recipe_file: str = ""

    def set_file(self, path: Path, package: str, text: str, display: str) -> None:
        for key, line in yaml_lines(text).items():
            if key == "defaults" or key.startswith("defaults["):
                continue
            full = f"{package}.{key}" if package else key
            self.entries[full] = Where(file=display, line=line)

    def where(self, key: str) -> Where:
        """The most specific known origin of ``key`` (falling back to parents)."""
        k = key
        while k:
            if k in self.entries:
                return self.entries[k]
            if k.endswith("]") and "[" in k:
                k = k[: k.rindex("[")]
            elif "." in k:
                k = k.rsplit(".", 1)[0]
            else:
                break
        return Where(file=self.recipe_file)


@dataclass
class Loaded:
    """A composed recipe: its config (without ``hydra``), file and provenance."""

    cfg: Any
    path: Path
    overrides: list[str]
    provenance: Provenance
    choices: dict[str, str]


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


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


class _DupLoader(yaml.SafeLoader):
    """Safe loading that notes keys given twice in one mapping (YAML would keep the last silently)."""

    dups: list[tuple[str, int, int]]

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for k, _ in node.value:
            key = k.value
            if key in seen:
                self.dups.append((str(key), k.start_mark.line + 1, seen[key]))
            else:
                seen[key] = k.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _check_yaml(path: Path) -> None:
    """YAML syntax errors and duplicate keys as problems with their lines (Hydra's
    messages have none)."""
    text = path.read_text()
    try:
        loader = _DupLoader(text)
        loader.dups = []
        try:
            loader.get_single_data()
        finally:
            loader.dispose()
        if loader.dups:
            at: dict[int, list[str]] = {}
            for k, ln in yaml_lines(text).items():
                at.setdefault(ln, []).append(k)

            def path_of(key: str, line: int) -> str:
                cands = [k for k in at.get(line, []) if k == key or k.endswith("." + key)]
                return min(cands, key=len) if cands else key

            raise RecipeError([Problem(path_of(key, line), f"key '{key}' appears twice in one mapping (first on line {first})",
                                       "give each key once: rename one of them, or merge their settings",
                                       Where(file=_display(path), line=line)) for key, line, first in loader.dups])
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        what = " ".join(str(getattr(exc, a, None) or "") for a in ("context", "problem")).strip() or str(exc).splitlines()[0]
        raise RecipeError([Problem("", f"YAML syntax error: {what}", "fix the YAML syntax (quote values that start with ?, :, {, [, * or &)",
                                   Where(file=_display(path), line=mark.line + 1 if mark else None))]) from exc


# Top-level schema keys every recipe has (with defaults) even when its file
# does not spell them out: ``output_dir=x`` must work without a '+'.
_SCHEMA_SCALARS = ("output_dir", "trace", "seed", "description", "allow_targets", "resume", "overwrite", "profile")
_SCHEMA_MAPS = ("placement", "batching", "runtime", "balance")
# Keys every node has (defaults 1) even when the recipe does not spell them out.
_NODE_KEYS = ("split", "replicas")


_PLAIN = re.compile(r"^[A-Za-z0-9_\-./:@+*%?|$ ]*$")
_INTERP = re.compile(r"^\$\{[^}]*\}$")


def text_keys(path: Path) -> set[str]:
    """Key paths the recipe file gives a string (or null) value: free text such as
    prompts, paths and names, which overrides may give as a shell user types them."""
    out = {"output_dir", "trace", "description", "name", "profile"}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return out

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if isinstance(v, dict):
                    walk(v, key)
                elif v is None or isinstance(v, str):
                    out.add(key)

    walk(data, "")
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


def register_resolvers() -> None:
    """``${example:NAME}``: a file shipped in recipes/examples (for default inputs);
    ``${now:FORMAT}``: the time (once per process, as in Hydra)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("example"):
        OmegaConf.register_new_resolver("example", lambda name: str(recipes_dir() / "examples" / str(name)))
    if not OmegaConf.has_resolver("now"):  # Hydra's own ${now:%Y-%m-%d}, for time-stamped output dirs
        from datetime import datetime

        def now(fmt: str) -> str:
            # MMPIPE_NOW: the launching process's time, so that every rank names the same folder
            t = os.environ.get("MMPIPE_NOW")
            return (datetime.fromisoformat(t) if t else datetime.now()).strftime(str(fmt))

        OmegaConf.register_new_resolver("now", now, use_cache=True)


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> Loaded:
    """Compose ``recipe`` with ``overrides`` (Hydra syntax); raise RecipeError on user mistakes."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    overrides = list(overrides or [])
    register_resolvers()
    path = resolve_recipe(str(recipe))
    _check_yaml(path)
    keys = text_keys(path)
    typed = [quote_free_text(o, keys) for o in overrides]
    shipped = path.parent == recipes_dir()
    extra = [] if shipped else [f"hydra.searchpath=[file://{recipes_dir()}]"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None, job_name="mmpipe"):
            cfg = compose(config_name=path.stem, overrides=[_schema_override(o) for o in typed] + extra, return_hydra_config=True)
    except RecipeError:
        raise
    except Exception as exc:  # Hydra's own errors: turn them into one problem each
        raise RecipeError([_hydra_problem(exc, overrides, path)]) from exc
    finally:
        GlobalHydra.instance().clear()

    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if not k.startswith("hydra/") and v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    prov = _provenance(path, choices, typed)
    for o_typed, o in zip(typed, overrides):  # name the override as the user wrote it
        for k, w in prov.entries.items():
            if w.override == o_typed:
                prov.entries[k] = Where(override=o)
    return Loaded(cfg=cfg, path=path, overrides=overrides, provenance=prov, choices=choices)


def _provenance(path: Path, choices: dict[str, str], overrides: list[str]) -> Provenance:
    prov = Provenance(recipe_file=_display(path))
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    defaults = data.get("defaults", []) if isinstance(data, dict) else []
    search = [path.parent, recipes_dir()]
    order: list[tuple[str, str] | None] = []  # (group, option) or None for _self_
    for entry in defaults:
        if entry == "_self_":
            order.append(None)
        elif isinstance(entry, dict):
            for g in entry:
                g2 = str(g).lstrip("+").split("@")[0].replace("override ", "").strip()
                if g2 in choices:
                    order.append((g2, choices[g2]))
    if None not in order:
        order.append(None)
    for item in order:
        if item is None:
            prov.set_file(path, "", text, _display(path))
            continue
        group, option = item
        for base in search:
            f = base / group / f"{option}.yaml"
            if f.is_file():
                t = f.read_text()
                prov.set_file(f, _package_of(t, group), t, _display(f))
                break
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        parsed = []
    for o in parsed:
        key = o.key_or_group
        if key in choices and not o.is_delete():
            continue  # a group choice: its file's lines were recorded above
        w = Where(override=o.input_line)
        prov.entries[key] = w
        for k in list(prov.entries):
            if k.startswith(key + ".") or k.startswith(key + "["):
                prov.entries[k] = w
    # A value that is exactly ${var}: a problem with it is the override of var's doing.
    for k, var in _references(text).items():
        src = prov.entries.get(var)
        if src is not None and src.override is not None:
            prov.entries[k] = src
    return prov


def _references(text: str) -> dict[str, str]:
    """Key path -> variable, for every value that is exactly ``${variable}``."""
    out: dict[str, str] = {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return out

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if isinstance(v, str) and _INTERP.match(v) and ":" not in v:
                    out[key] = v[2:-1].strip()
                walk(v, key)

    walk(data, "")
    return out


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
            axes.append([f"{prefix}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)]
