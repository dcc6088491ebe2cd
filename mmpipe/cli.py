"""The ``mmpipe`` command: run, validate, plan, ls, cp, convert (the contract users script against).

Exit codes: 0 all good; 2 a user error (recipe, overrides, arguments: one
short message, no traceback unless --debug); 1 one or more requests failed.
This is the only module that wires the compiler and the runtime together.
"""
from __future__ import annotations

import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpipe.run import Terminated, cmd_run, watch_signals

USAGE = """usage: mmpipe COMMAND [RECIPE] [overrides...] [options]

commands:
  run RECIPE [overrides]        run the recipe's requests, write results into output_dir
  validate RECIPE [overrides]   report every problem at once (exit 2 if any); loads no weights
  plan RECIPE [overrides]       print the compiled plan [--format text|json|mermaid|dot] [--schedule M]
                                [--simulate]: predicted throughput, latency, busy %, bubble (needs profile=)
  serve RECIPE [overrides]      OpenAI-compatible HTTP endpoints (/v1/audio/transcriptions, /v1/images/generations, ...)
                                [--host 127.0.0.1] [--port 8000] [--max-queue 256] [--request-timeout 300] [--grace 30]
  profile RECIPE [overrides]    measure every part of every node; writes profile.json [--microbatches K] [--chart]
                                [--co-run]: also beside the same recipe on every other core (for --simulate)
  ls [--kinds]                  shipped recipes with one-line descriptions (and node kinds)
  ls RECIPE | KIND              a recipe's variables, or a node kind's ports and parameters
  cp RECIPE DEST.yaml           copy a shipped recipe to edit [--force]
  convert ctranslate2 SRC DST   convert a CTranslate2 Whisper directory to transformers

RECIPE is a name from `mmpipe ls` or a path to a .yaml file.
overrides use Hydra syntax: key=value  +key=value  ~key  group=option  key=a,b (with -m)
free text needs no Hydra quoting: prompt="a cat, oil painting"  "prompt=it's a cat"

options:
  -m, --multirun      sweep over comma-separated override values (one output dir per job)
  --cfg job           print the composed config and exit (add --resolve to resolve it)
  --debug             show Python tracebacks for user errors
  -q, --quiet         warnings only: no progress bar, no per-request lines
  -v, --verbose       more detail in the log (-vv: everything)
  --version, --info   mmpipe's version; versions, search path, cache and devices
  --shell-completion install=bash|zsh   print a completion script (eval it in your shell)
  -h, --help          this help; `mmpipe run RECIPE --help` shows the recipe's options
"""


@dataclass
class Args:
    command: str = ""
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    multirun: bool = False
    cfg: str | None = None
    resolve: bool = False
    debug: bool = False
    quiet: bool = False
    help: bool = False
    format: str = "text"
    schedule: int | None = None
    simulate: bool = False
    chart: bool = False
    co_run: bool = False
    microbatches: int | None = None
    kinds: bool = False
    verbose: int = 0
    force: bool = False
    names: bool = False  # ls --names / --keys: plain words for shell completion
    keys: bool = False
    serve: dict[str, str] = field(default_factory=dict)  # serve's --host, --port, --max-queue, --request-timeout, --grace
    extra: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # the command line itself (re-run by each rank)


class UsageError(Exception):
    pass


SERVE_OPTIONS = ("--host", "--port", "--max-queue", "--request-timeout", "--grace")


def cmd_serve(a: Args) -> int:
    """``mmpipe serve``: compile once, then serve until SIGTERM (``mmpipe/serve``)."""
    if a.multirun or a.cfg:
        raise UsageError("serve takes no -m or --cfg")
    if set(a.serve) - {"host", "port", "max_queue", "request_timeout", "grace"}:
        raise UsageError("serve's options: " + " ".join(SERVE_OPTIONS))
    from mmpipe.serve import Settings, cmd_serve as serve

    st = Settings()
    try:
        st.host = a.serve.get("host", st.host) or st.host
        st.port = int(a.serve.get("port", st.port))
        st.max_queue = int(a.serve.get("max_queue", st.max_queue))
        st.timeout_s = float(a.serve.get("request_timeout", st.timeout_s))
        st.grace_s = float(a.serve.get("grace", st.grace_s))
    except ValueError as exc:
        raise UsageError(f"serve: {exc} (--port, --max-queue: integers; --request-timeout, --grace: seconds)") from None
    if not 0 <= st.port < 65536 or st.max_queue < 1 or st.timeout_s <= 0 or st.grace_s < 0:
        raise UsageError("serve: --port 0..65535 (0: any free port), --max-queue >= 1, --request-timeout > 0, --grace >= 0")
    _, plan = prepare(a, a.overrides)
    return serve(plan, a.raw, st)


def parse_args(argv: list[str]) -> Args:
    a = Args(raw=list(argv))
    it = iter(argv)
    positional: list[str] = []
    for tok in it:
        if tok in ("-h", "--help"):
            a.help = True
        elif tok in ("-m", "--multirun"):
            a.multirun = True
        elif tok == "--debug":
            a.debug = True
        elif tok in ("-q", "--quiet"):
            a.quiet = True
        elif tok == "--resolve":
            a.resolve = True
        elif tok == "--kinds":
            a.kinds = True
        elif tok in ("-v", "--verbose", "-vv"):
            a.verbose += 2 if tok == "-vv" else 1
        elif tok == "--force":
            a.force = True
        elif tok in ("--names", "--keys"):
            a.names, a.keys = a.names or tok == "--names", a.keys or tok == "--keys"
        elif tok in ("--version", "--info"):
            a.command = tok[2:]
        elif tok == "--shell-completion" or tok.startswith("--shell-completion="):
            v = tok.split("=", 1)[1] if "=" in tok else next(it, "install=bash")
            a.command, a.extra = "shell-completion", [v.split("=", 1)[-1]]
        elif tok in ("--cfg", "-c") or tok.startswith("--cfg="):
            a.cfg = tok.split("=", 1)[1] if "=" in tok else next(it, None)
            if a.cfg not in ("job", "all"):
                raise UsageError("--cfg takes 'job' (or 'all')")
        elif tok == "--format" or tok.startswith("--format="):
            a.format = tok.split("=", 1)[1] if "=" in tok else next(it, "")
            if a.format not in ("text", "json", "mermaid", "dot"):
                raise UsageError(f"--format must be text, json, mermaid or dot, got '{a.format}'")
        elif tok == "--schedule" or tok.startswith("--schedule="):
            v = tok.split("=", 1)[1] if "=" in tok else next(it, "")
            if not v.isdigit() or int(v) <= 0:
                raise UsageError(f"--schedule takes a positive number of micro-batches, got '{v}'")
            a.schedule = int(v)
        elif tok == "--simulate":
            a.simulate = True
        elif tok == "--chart":
            a.chart = True
        elif tok == "--co-run":
            a.co_run = True
        elif tok == "--microbatches" or tok.startswith("--microbatches="):
            v = tok.split("=", 1)[1] if "=" in tok else next(it, "")
            if not v.isdigit() or int(v) <= 0:
                raise UsageError(f"--microbatches takes a positive number, got '{v}'")
            a.microbatches = int(v)
        elif tok.split("=", 1)[0] in SERVE_OPTIONS:
            name, _, v = tok.partition("=")
            a.serve[name[2:].replace("-", "_")] = v if _ else next(it, "")
        elif tok.startswith("--"):
            raise UsageError(f"unknown option {tok}")
        else:
            positional.append(tok)
    if positional and a.command not in ("version", "info", "shell-completion"):
        a.command = positional.pop(0)
    if a.command in ("run", "validate", "plan", "profile", "serve") and positional:
        a.recipe = positional.pop(0)
        a.overrides = positional
    elif a.command not in ("version", "info", "shell-completion"):
        a.extra = positional
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = _main(argv)
    from mmpipe.launch import exit_now, in_rank_process

    if in_rank_process() and "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            exit_now(code)
    return code


def _logging(quiet: bool, verbose: int) -> None:
    """mmpipe's log to stderr: warnings with -q, progress notes by default, details with -v."""
    import logging

    class Prefixed(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = super().format(record)
            return msg if msg.startswith("mmpipe") else f"mmpipe: {msg}"

    from mmpipe.launch import in_rank_process

    logger = logging.getLogger("mmpipe")
    console = next((h for h in logger.handlers if getattr(h, "_mmpipe_cli", False)), None)
    if console is None:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(Prefixed("%(message)s"))
        console._mmpipe_cli = True  # type: ignore[attr-defined]
        logger.addHandler(console)
    # the logger passes everything to the rank log files; the console shows what was asked for
    # (ranks say little there: their notes are in <output_dir>/logs/rankK.log)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_console = quiet or (in_rank_process() and not verbose)
    console.setLevel(logging.WARNING if quiet_console else logging.DEBUG if verbose else logging.INFO)
    if verbose >= 2:
        logging.getLogger().setLevel(logging.DEBUG)  # the libraries' own logs too


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv
    if threading.current_thread() is threading.main_thread():
        import signal

        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `mmpipe plan ... | head` ends quietly
    # ${now:...} (time-stamped output dirs): one time for this command and every rank it starts
    import os
    from datetime import datetime

    os.environ.setdefault("MMPIPE_NOW", datetime.now().isoformat())
    if threading.current_thread() is threading.main_thread():
        watch_signals()
    try:
        args = parse_args(argv)
        _logging(args.quiet, args.verbose)
        return dispatch(args)
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # user errors become exit 2; anything else is a bug: show it
        from mmpipe.dsl.errors import RecipeError
        from mmpipe.graphs.base import UserError

        if isinstance(exc, RecipeError):
            print(exc.format(), file=sys.stderr)
        elif isinstance(exc, UserError):
            print(f"error: {exc.key}: {exc.message}" + (f"\n    fix: {exc.fix}" if exc.fix else ""), file=sys.stderr)
        elif isinstance(exc, UsageError):
            print(f"error: {exc}\n(see mmpipe --help)", file=sys.stderr)
        else:
            traceback.print_exc()
            return 1
        if debug:
            traceback.print_exc()
        return 2


def dispatch(a: Args) -> int:
    if not a.command or (a.help and not a.recipe):
        print(USAGE)
        return 0 if a.help or not a.command else 2
    if a.command == "version":
        import importlib.metadata as md

        print(f"mmpipe {md.version('mmpipe')}")
        return 0
    if a.command in ("info", "shell-completion"):
        from mmpipe import describe

        print(describe.info() if a.command == "info" else describe.completion(a.extra[0]), end="\n" if a.command == "info" else "")
        return 0
    if a.command == "ls":
        return cmd_ls(a)
    if a.command == "cp":
        return cmd_cp(a)
    if a.command == "convert":
        return cmd_convert(a)
    if a.command not in ("run", "validate", "plan", "profile", "serve"):
        raise UsageError(f"unknown command '{a.command}'")
    if not a.recipe:
        raise UsageError(f"'{a.command}' needs a RECIPE (see mmpipe ls)")
    if a.help:
        return cmd_recipe_help(a)
    if a.command == "serve":
        return cmd_serve(a)
    if a.multirun:
        return cmd_multirun(a)
    return run_one(a, a.overrides)


def prepare(a: Args, overrides: list[str], job: int | None = None) -> tuple[Any, Any]:
    """Compose and compile (``job``: index in a ``-m`` sweep): the loaded recipe and its plan."""
    from mmpipe.dsl.compile import compile_loaded
    from mmpipe.dsl.load import load_recipe
    from mmpipe.launch import rank_overrides

    loaded = load_recipe(a.recipe or "", rank_overrides(overrides))
    if a.cfg:
        return loaded, None
    mode = "profile" if a.command == "profile" else "simulate" if a.command == "plan" and a.simulate else "run"
    plan = compile_loaded(loaded, mode=mode, microbatches=a.schedule if a.command == "plan" else None)
    dirs = loaded.hydra_dirs
    if job is None and "run.dir" in dirs:
        plan.output_dir = dirs["run.dir"]  # Hydra's run directory, when the user set it
    if job is not None:
        if "sweep.dir" in dirs:
            plan.output_dir = str(Path(dirs["sweep.dir"]) / (dirs.get("sweep.subdir") or str(job)))
        else:
            plan.output_dir = str(Path(plan.output_dir) / "multirun" / str(job))
    return loaded, plan


def run_one(a: Args, overrides: list[str], job: int | None = None, prepared: tuple[Any, Any] | None = None) -> int:
    """Validate, plan or run one composition (``job``: index in a ``-m`` sweep)."""
    from mmpipe.launch import in_rank_process

    loaded, plan = prepared or prepare(a, overrides, job)
    if a.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(loaded.cfg, resolve=a.resolve), end="")
        return 0
    if a.command == "profile":
        from mmpipe.profile_cmd import cmd_profile

        return cmd_profile(loaded, a)
    if job is not None:
        print(f"[job {job}] {' '.join(overrides) or '(no overrides)'} -> {plan.output_dir}")
    if a.command == "validate":
        from mmpipe.api import requests_of

        n = len(requests_of(plan)) if plan.source else 0
        print(f"ok: {plan.recipe} ({loaded.path}): {len(plan.nodes)} nodes, {plan.num_stages} stages, {n} request(s)")
        return 0
    if a.command == "plan":
        return print_plan(plan, a)
    own_dir = job is None and "run.dir" not in loaded.hydra_dirs
    if plan.distributed:
        from mmpipe.api import requests_of
        from mmpipe.launch import launch_local, run_as_rank

        if in_rank_process():
            return run_as_rank(plan, lambda p: cmd_run(p, loaded, a.quiet, own_dir))
        requests_of(plan)  # a user error in the inputs stops here, before any rank starts
        # the ranks run this job alone (a sweep's other jobs are not theirs), in this job's folder
        argv = a.raw if job is None else ["run", a.recipe or "", *overrides, f"output_dir={plan.output_dir}"] + [
            f for f in a.raw if f in ("-q", "--quiet", "--debug", "-v", "--verbose")]
        return launch_local(plan, argv)
    if in_rank_process():
        raise UsageError("this process was started by torchrun, but the recipe runs in one process: add runtime=distributed")
    return cmd_run(plan, loaded, a.quiet, own_dir)


def print_plan(plan: Any, a: Args) -> int:
    if a.simulate:
        from mmpipe.profile_cmd import print_simulation

        return print_simulation(plan, a)
    if a.format == "json":
        print(plan.to_json())
    elif a.format == "mermaid":
        print(plan.to_mermaid())
    elif a.format == "dot":
        print(plan.to_dot())
    else:
        from mmpipe.dsl import schedule as sch

        print(plan.to_text())
        if plan.predicted:
            from mmpipe.dsl.predict import format_prediction

            print(format_prediction(plan.predicted, plan))
        p = plan.num_stages
        m = a.schedule or max(2 * p, 4)
        names = None
        if plan.loops:
            from mmpipe.graphs.base import make_config
            from mmpipe.runtime.nodes import kind_class

            lp = plan.loops[0]
            cls = kind_class(plan, lp.node)
            n = cls.expected_trips(make_config(cls.Config, plan.nodes[lp.node].config))
            trips = [n] * m if n else [2 + (i % 3) for i in range(m)]
            what = f"{n} iterations each" if n else "2-4 iterations each (a guess: the data decides)"
            inflight = int(plan.runtime.get("max_inflight", 0)) or max(len(lp.stages), 2)
            table = sch.loop_reentry(len(lp.stages), trips, inflight)
            names = [f"stage {s}" for s in lp.stages]
            print(f"\nschedule of loop '{lp.node}' ({m} micro-batches, {what}, {inflight} in flight; cell = mb.iteration):")
        else:
            table = sch.streaming(p, m)
            print(f"\nschedule ({m} micro-batches, streaming; bubble {100 * sch.bubble(table):.0f}%, GPipe theory {100 * sch.theory_bubble(p, m):.0f}%):")
        print(sch.grid(table, stage_names=names))
    return 0


def cmd_multirun(a: Args) -> int:
    """Every job of the sweep is composed and checked first: all problems of all jobs are
    reported before any job runs."""
    from mmpipe.dsl.errors import RecipeError
    from mmpipe.dsl.overrides import expand_sweep

    jobs = expand_sweep(a.overrides)
    prepared, bad = [], []
    for i, ovs in enumerate(jobs):
        try:
            prepared.append(prepare(a, ovs, job=i))
        except RecipeError as e:
            bad.append(f"[job {i}] {' '.join(ovs)}:\n" + e.format())
    if bad:
        print("\n".join(bad), file=sys.stderr)
        return 2
    worst = 0
    for i, (ovs, prep) in enumerate(zip(jobs, prepared)):
        worst = max(worst, run_one(a, ovs, job=i, prepared=prep))
    return worst


def cmd_ls(a: Args) -> int:
    from mmpipe.dsl.load import recipe_description, recipes_dir, shipped_recipes

    recipes = shipped_recipes()
    if a.names:
        print(" ".join(list(recipes) + ["--help"]))
        return 0
    if a.extra:
        return cmd_ls_one(a.extra[0], a.keys)
    w = max(len(n) for n in recipes)
    for name, path in recipes.items():
        print(f"{name.ljust(w)}  {recipe_description(path)}")
    groups = sorted(p.name for p in recipes_dir().iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    for g in groups:
        print(f"  group {g}: " + ", ".join(sorted(q.stem for q in (recipes_dir() / g).glob("*.yaml"))))
    if a.kinds:
        from mmpipe.graphs import get_kind, get_source, kind_names, source_names

        print("node kinds:")
        for k in kind_names():
            print(f"  {k}: {get_kind(k).description}")  # type: ignore[union-attr]
        print("sources:")
        for k in source_names():
            print(f"  {k}: {get_source(k).description}")  # type: ignore[union-attr]
    return 0


def cmd_ls_one(name: str, keys: bool) -> int:
    """``mmpipe ls KIND`` (ports and parameters) or ``mmpipe ls RECIPE`` (its variables)."""
    from mmpipe import describe
    from mmpipe.dsl.load import shipped_recipes
    from mmpipe.graphs import get_kind, get_source, kind_names, source_names

    if keys:
        print(" ".join(describe.completion_words(name)))
        return 0
    if name in shipped_recipes() or name.endswith((".yaml", ".yml")):
        print(describe.describe_recipe(name))
        return 0
    if "." in name and (get_kind(name) or get_source(name)):
        print(describe.describe_kind(name))
        return 0
    from mmpipe.dsl.errors import did_you_mean

    hint = did_you_mean(name, list(shipped_recipes()) + kind_names() + source_names())
    raise UsageError(f"'{name}' is neither a recipe nor a node kind" + (f" ({hint})" if hint else "; see `mmpipe ls --kinds`"))


def cmd_cp(a: Args) -> int:
    if len(a.extra) != 2:
        raise UsageError("usage: mmpipe cp RECIPE DEST.yaml [--force]")
    from mmpipe import describe

    out = describe.copy_recipe(a.extra[0], a.extra[1], a.force)
    print(f"copied {a.extra[0]} to {out}: edit it, then `mmpipe run {out}` (the shipped config groups still apply)")
    return 0


def cmd_recipe_help(a: Args) -> int:
    from omegaconf import OmegaConf

    from mmpipe.dsl.load import load_recipe

    loaded = load_recipe(a.recipe or "", a.overrides)
    first = loaded.path.read_text().splitlines()[:1]
    print(f"{loaded.path.stem}: {loaded.cfg.get('description', '')}")
    if first and first[0].startswith("#"):
        print(f"run it: {first[0].lstrip('# ').strip()}")
    from mmpipe.describe import fitting_options

    print("\n== config groups (group=option) ==")
    for g, choice in loaded.choices.items():
        print(f"{g}: {', '.join(fitting_options(loaded, g))} (now: {choice})")
    print("\n== config (override any key: key=value) ==")
    print(OmegaConf.to_yaml(loaded.cfg), end="")
    return 0


def cmd_convert(a: Args) -> int:
    if len(a.extra) != 3 or a.extra[0] != "ctranslate2":
        raise UsageError("usage: mmpipe convert ctranslate2 SRC DST")
    from mmpipe.graphs.whisper_ct2 import convert_main

    return convert_main(a.extra[1], a.extra[2])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
