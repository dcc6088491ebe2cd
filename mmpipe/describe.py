"""What the CLI tells about recipes and node kinds: ``ls KIND``, ``ls RECIPE``, ``cp``,
``--help`` on a recipe, ``--info``, ``--shell-completion``.

Everything here reads declarations only (kinds' ports and config dataclasses,
recipe files); nothing loads weights. ``kind_reference`` also renders
``docs/kinds.md``.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import shutil
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

import yaml


def _type(tp: Any) -> str:
    from mmpipe.dsl.typecheck import type_name

    return type_name(tp)


def _default(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
        return "(nested, see below)" if dataclasses.is_dataclass(v) else repr(v)
    return "(required)"


def field_docs(cls: type) -> dict[str, str]:
    """A config dataclass's field docs: the comment on a field's line, else the comment
    lines right above it (inherited fields from the base classes' source). Comments are
    how fields are documented here: they read well in the source and cost nothing at run
    time; ``field(metadata={"doc": ...})`` is honoured too, for generated classes."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined in a REPL or generated: no source to read
            continue
        comments: dict[int, str] = {}
        code_lines: set[int] = set()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                code_lines.add(tok.start[0])
        body = ast.parse(src).body[0]
        assert isinstance(body, ast.ClassDef)
        for node in body.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            doc = comments.get(node.end_lineno or node.lineno, "")
            if not doc:  # the comment-only lines right above the field
                above, ln = [], node.lineno - 1
                while ln in comments and ln not in code_lines:
                    above.insert(0, comments[ln])
                    ln -= 1
                doc = " ".join(above)
            docs[node.target.id] = doc
    return docs


def config_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(name, type, default, doc) of every config field, nested ones as ``a.b``."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, Any)
        rows.append((prefix + f.name, _type(tp), _default(f), str(f.metadata.get("doc", "")) or docs.get(f.name, "")))
        if dataclasses.is_dataclass(tp):
            rows += config_rows(tp, f"{prefix}{f.name}.")
    return rows


def port_line(p: Any) -> str:
    shape = "[" + ", ".join(str(d) for d in p.shape) + "]" if p.shape is not None else "-"
    extra = ", optional" if p.optional else ""
    return f"{p.name}: {p.dtype} {shape} (collate {p.collate}{extra})" + (f" - {p.doc}" if p.doc else "")


def describe_kind(name: str) -> str:
    """A node kind's contract: what it is, its ports and its parameters."""
    from mmpipe.graphs import get_kind, get_source

    cls = get_kind(name)
    src = None if cls is not None else get_source(name)
    if cls is None and src is None:
        raise KeyError(name)
    lines: list[str] = []
    if cls is not None:
        traits = [t for t, on in (("splittable", cls.splittable), ("loop", cls.loop), ("light", cls.light), ("expands items", cls.expands)) if on]
        lines += [f"{name}: {cls.description}", f"  {', '.join(traits) or 'one piece'}"]
        try:
            ins, outs = cls.ports(cls.Config())
        except Exception:  # ports that need required parameters: the declared defaults
            ins, outs = cls.inputs, cls.outputs
        lines += ["inputs:"] + [f"  {port_line(p)}" for p in ins] + ["outputs:"] + [f"  {port_line(p)}" for p in outs]
        if cls.request_params:
            lines.append(f"per request (ItemMeta.params): {', '.join(cls.request_params)}")
        config = cls.Config
    else:
        assert src is not None
        lines += [f"{name}: {src.description}", f"  request source; fills: {', '.join(src.fields)}"]
        config = src.Config
    rows = config_rows(config)
    lines.append("parameters:" if rows else "parameters: none")
    w = max((len(r[0]) for r in rows), default=0)
    for n, t, d, doc in rows:
        lines.append(f"  {n.ljust(w)}  {t} = {d}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines)


def recipe_variables(path: Path) -> list[tuple[str, Any, str]]:
    """A recipe's top-level variables (keys that some ``${...}`` uses): name, default, comment."""
    from mmpipe.dsl.schema import Top

    text = path.read_text()
    data = yaml.safe_load(text) or {}
    used = {m.split(".")[0].split("[")[0] for m in __import__("re").findall(r"\$\{\s*([\w.\[\]]+)\s*\}", text)}
    schema = {f.name for f in dataclasses.fields(Top)}
    comments = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key and not key.startswith((" ", "#", "-")) and "#" in rest:
            comments[key.strip()] = rest.split("#", 1)[1].strip()
    return [(k, v, comments.get(k, "")) for k, v in data.items() if k in used and k not in schema and k != "defaults"]


def describe_recipe(name: str) -> str:
    from mmpipe.dsl.load import recipe_description, resolve_recipe

    path = resolve_recipe(name)
    first = path.read_text().splitlines()[:1]
    lines = [f"{path.stem}: {recipe_description(path)}"]
    if first and first[0].startswith("#"):
        lines.append(f"run it: {first[0].lstrip('# ').strip()}")
    rows = recipe_variables(path)
    lines.append("variables (override with name=value):" if rows else "variables: none")
    w = max((len(r[0]) for r in rows), default=0)
    for k, v, c in rows:
        lines.append(f"  {k.ljust(w)} = {v!r}" + (f"  # {c}" if c else ""))
    return "\n".join(lines)


def copy_recipe(name: str, dest: str, force: bool = False) -> Path:
    """A shipped recipe copied to edit (its config groups stay usable from the copy)."""
    from mmpipe.dsl.load import resolve_recipe
    from mmpipe.graphs.base import UserError

    src = resolve_recipe(name)
    out = Path(dest)
    if out.is_dir():
        out = out / src.name
    if out.suffix not in (".yaml", ".yml"):
        raise UserError("DEST", f"'{dest}' is not a .yaml file name", f"e.g. mmpipe cp {name} my_{src.stem}.yaml")
    if out.exists() and not force:
        raise UserError("DEST", f"'{out}' exists", "choose another name, or add --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out


def fitting_options(loaded: Any, group: str) -> list[str]:
    """The options of a config group that fit this recipe: those whose keys mostly match
    the chosen option's (a Whisper recipe is not offered diffusion models)."""
    from mmpipe.dsl.load import recipes_dir

    # ``model@image_model``: the group ``model`` placed under another key
    files = {q.stem: q for q in (recipes_dir() / group.split("@")[0]).glob("*.yaml")}
    chosen = files.get(loaded.choices.get(group, ""))

    def keys(p: Path) -> set[str]:
        d = yaml.safe_load(p.read_text()) or {}
        return set(d) if isinstance(d, dict) else set()

    if chosen is None:
        return sorted(files)
    mine = keys(chosen)
    return sorted(n for n, p in files.items() if len(keys(p) & mine) >= 0.6 * len(keys(p) | mine))


def info() -> str:
    """Versions, where things are, and which devices torch sees (``mmpipe --info``)."""
    import importlib.metadata as md
    import os
    import platform

    from mmpipe.dsl.load import recipes_dir

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    lines = [f"mmpipe {ver('mmpipe')} (python {platform.python_version()})"]
    lines += [f"  {p}: {ver(p)}" for p in ("torch", "transformers", "diffusers", "hydra-core", "omegaconf")]
    cache = os.environ.get("MMPIPE_CACHE") or str(Path.home() / ".cache" / "mmpipe")
    lines += [f"recipes (config search path): {recipes_dir()}", f"model cache (MMPIPE_CACHE): {cache}"]
    try:
        from mmpipe.dsl.stages import machine_devices

        lines.append(f"devices: {', '.join(machine_devices())}")
    except Exception as exc:  # torch missing or broken: say so
        lines.append(f"devices: unknown ({exc})")
    return "\n".join(lines)


COMMANDS = ("run", "validate", "plan", "ls", "cp", "convert")


def completion(shell: str) -> str:
    """A completion script: commands, recipe names, group=option and recipe variables."""
    if shell not in ("bash", "zsh"):
        from mmpipe.graphs.base import UserError

        raise UserError("--shell-completion", f"no completion for '{shell}'", "use install=bash or install=zsh")
    script = '''_mmpipe() {
    local cur="${COMP_WORDS[COMP_CWORD]}" words
    if [ "$COMP_CWORD" -eq 1 ]; then
        words="%(commands)s"
    elif [ "$COMP_CWORD" -eq 2 ]; then
        words="$(mmpipe ls --names 2>/dev/null)"
    else
        words="$(mmpipe ls "${COMP_WORDS[2]}" --keys 2>/dev/null)"
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
''' % {"commands": " ".join(COMMANDS)}
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + script + "complete -o nospace -F _mmpipe mmpipe\n"
    return script + "complete -o nospace -F _mmpipe mmpipe\n"


def completion_words(recipe: str) -> list[str]:
    """Overrides worth completing for a recipe: ``group=option`` and ``variable=``."""
    from mmpipe.dsl.load import recipes_dir, resolve_recipe

    path = resolve_recipe(recipe)
    data = yaml.safe_load(path.read_text()) or {}
    out = [f"{k}=" for k, _, _ in recipe_variables(path)]
    for entry in data.get("defaults", []) if isinstance(data, dict) else []:
        if isinstance(entry, dict):
            for g in entry:
                out += [f"{g}={q.stem}" for q in sorted((recipes_dir() / str(g)).glob("*.yaml"))]
    return out + ["output_dir=", "resume=true", "overwrite=true", "trace="]


def kind_reference() -> str:
    """``docs/kinds.md``: every node kind and source, from their own declarations."""
    from mmpipe.graphs import kind_names, source_names

    parts = ["# Node kinds and request sources", "",
             "Generated from the kinds' own declarations by `mmpipe ls KIND` (`python -m mmpipe.describe > docs/kinds.md`);",
             "a test fails when this file is stale. Shapes are symbolic: `B` is the micro-batch, other letters are sizes",
             "that must agree along each wire.", ""]
    for name in kind_names() + source_names():
        parts += [f"## `{name}`", "", "```", describe_kind(name), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    print(kind_reference(), end="")
