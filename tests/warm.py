"""Warm starts for the tests that run the CLI: a fork server that has imported torch once.

The integration tests and the README test run ``mmpipe`` as a user does, one process per
command, and on this machine each process spends 1.5-2 s importing torch: more than many
of the runs themselves. The server (``python tests/warm.py SOCKET``) imports torch and
numpy once; per command it forks a child that becomes ``python -m mmpipe ARGS``, with the
caller's working directory, environment, stdin/stdout/stderr and exit status, as a fresh
interpreter would have them, minus the import.

What a fork cannot reproduce, it does not try:
- a command whose environment differs from the server's in a variable read while torch,
  numpy or the interpreter start (thread counts, CUDA, allocators, ``PYTHON*`` other than
  ``PYTHONPATH``, which the child applies itself) runs cold, as ``python -m mmpipe``;
- mmpipe's own modules are never imported by the server, so what mmpipe reads from the
  environment at import time (``MMPIPE_CACHE``, ...) is read fresh;
- ``MMPIPE_TEST_COLD=1`` turns it off: every command then runs cold.

The client is a small script, ``<bin>/mmpipe``, run with ``python -S`` (it imports only
the standard library): it hands its argv, cwd, environment and file descriptors 0-2 to the
server, forwards the signals it gets to the child, and exits as the child did (killed by
the same signal, or with the same code). When it dies (a test's timeout kills it), the
server kills the child. When the server is not up yet, the client runs the command cold.
This file is imported by the client with ``-S``, so it imports nothing outside the
standard library at module level.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
from typing import Any

# A variable whose value torch, numpy/OpenBLAS, glibc or the interpreter read while starting:
# a command whose environment differs from the server's in one of these runs cold.
IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "GOTO_", "BLIS_", "NUMEXPR_", "CUDA_", "NVIDIA_", "TORCH",
               "PYTORCH_", "NCCL_", "LD_", "MALLOC_", "GLIBC_", "PYTHON", "LC_", "LANG", "TZ")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def cold_reason(base: dict[str, str], env: dict[str, str]) -> str | None:
    """Why a command with ``env`` cannot start from a server started with ``base`` (None: it can)."""
    for key in sorted(set(base) | set(env)):
        if base.get(key) != env.get(key) and key != "PYTHONPATH" and key.startswith(IMPORT_TIME):
            return f"{key} differs from the warm server's"
    return None


# ------------------------------------------------------------------ starting it (in pytest)
_STARTED: dict[str, str] = {}


def bin_dir() -> str | None:
    """A folder whose ``mmpipe`` runs through the warm server, which starts on first call
    (in the background: until it listens, commands run cold); None when MMPIPE_TEST_COLD=1."""
    if os.environ.get("MMPIPE_TEST_COLD") == "1":
        return None
    if not _STARTED:
        import atexit
        import subprocess
        import tempfile

        d = tempfile.mkdtemp(prefix="mmpipe-warm-")
        sock = os.path.join(d, "server.sock")
        _STARTED.update(bin=d, sock=sock)
        shim("mmpipe")
        log = open(os.path.join(d, "server.log"), "wb")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), sock], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})

        def stop() -> None:
            import shutil

            proc.terminate()
            proc.wait()
            log.close()
            shutil.rmtree(d, ignore_errors=True)

        atexit.register(stop)
    return _STARTED["bin"]


def shim(module: str) -> str:
    """``<bin>/NAME``: runs ``python -m MODULE ARGS`` through the server (``mmpipe`` is made at start)."""
    path = os.path.join(_STARTED["bin"], module)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                f"from warm import client\nclient({_STARTED['sock']!r}, {sys.executable!r}, {module!r}, sys.argv[1:])\n")
    os.chmod(path, 0o755)
    return path


def ready(timeout: float = 60.0) -> bool:
    """Whether the server listens (waiting up to ``timeout`` seconds for it)."""
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(_STARTED["sock"]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------ the client (python -S)
def client(path: str, python: str, module: str, args: list[str]) -> None:
    """Run ``python -m MODULE ARGS`` through the server at ``path``; cold when it cannot."""

    def cold() -> None:
        os.execv(python, [python, "-m", module, *args])

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    body = json.dumps({"module": module, "argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    try:
        sock.connect(path)
        socket.send_fds(sock, [len(body).to_bytes(8, "big")], [0, 1, 2])
        sock.sendall(body)
    except OSError:
        cold()  # the server is not up yet, or gone; or this process lacks one of fds 0-2
    answers = sock.makefile("rb")
    first = json.loads(answers.readline() or b'{"cold": "the warm server closed the connection"}')
    if "cold" in first:
        sock.close()
        cold()
    pid = int(first["pid"])

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # it has just ended: its status is on the way

    for sig in FORWARDED:
        signal.signal(sig, forward)
    line = answers.readline()
    code = int(json.loads(line)["code"]) if line else 1
    if code < 0:  # killed by a signal: so is this process, as a fresh interpreter's caller would see it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


# ------------------------------------------------------------------ the server
class _Become(BaseException):
    """Raised in a forked child: unwind the server's frames, then run the module at top level."""

    def __init__(self, module: str) -> None:
        self.module = module


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the client went away")
        out += chunk
    return out


def _child(conn: socket.socket, fds: list[int], req: dict[str, Any], base_path: list[str], keep: set[int]) -> None:
    """In the forked child: take the caller's stdio, cwd, environment and path; then raise _Become."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, *FORWARDED):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # what a fresh interpreter installs
    conn.close()
    for fd in keep:
        os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    extra = [os.path.abspath(p) for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *base_path]  # as ``python -m`` builds it
    sys.argv[:] = ["-m", *req["argv"]]
    raise _Become(req["module"])


def _send(conn: socket.socket, answer: dict[str, Any]) -> None:
    conn.sendall(json.dumps(answer).encode() + b"\n")


def _accept(listener: socket.socket, running: dict[int, socket.socket], base_env: dict[str, str], base_path: list[str],
            own_fds: set[int]) -> None:
    """Take one request: answer "cold", or fork the child that runs it (the parent returns)."""
    conn, _ = listener.accept()
    try:
        head, fds, _, _ = socket.recv_fds(conn, 8, 3)
        head += _recv_exact(conn, 8 - len(head))
        req = json.loads(_recv_exact(conn, int.from_bytes(head, "big")))
    except (OSError, ValueError, ConnectionError):
        conn.close()
        return
    reason = cold_reason(base_env, req["env"]) or (None if len(fds) == 3 else "no stdio")
    if reason:
        print(f"cold: {req['argv'][:2]}: {reason}", flush=True)
        _send(conn, {"cold": reason})
        conn.close()
    else:
        pid = os.fork()
        if pid == 0:
            _child(conn, fds, req, base_path, {listener.fileno(), *own_fds, *(c.fileno() for c in running.values())})
        print(f"warm {pid}: {req['argv'][:2]}", flush=True)
        _send(conn, {"pid": pid})
        running[pid] = conn
    for fd in fds:
        os.close(fd)


def _reap(running: dict[int, socket.socket]) -> None:
    """Tell the clients of the children that ended how they ended."""
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = running.pop(pid, None)
        if conn is not None:
            try:
                _send(conn, {"code": os.waitstatus_to_exitcode(status)})
            except OSError:
                pass
            conn.close()


def serve(path: str) -> None:
    """Import torch, then fork one child per request until the parent (pytest) is gone."""
    import numpy  # noqa: F401  (what a CLI start spends its time on)
    import torch  # noqa: F401

    base_env = dict(os.environ)
    own = [os.path.abspath(p) for p in base_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    base_path = [p for p in sys.path[1:] if p not in own]
    parent = os.getppid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # clients connect only once it listens
    running: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        ready, _, _ = select.select([listener, wake_r, *running.values()], [], [], 1.0)
        for r in ready:
            if r is listener:
                _accept(listener, running, base_env, base_path, {wake_r, wake_w})
            elif r is wake_r:
                os.read(wake_r, 4096)
            else:  # a client's socket is readable only once it closed: the client died
                pid = next(p for p, c in running.items() if c is r)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _reap(running)
    listener.close()
    os.unlink(path)


if __name__ == "__main__":
    try:
        serve(sys.argv[1])
    except _Become as become:  # only ever in a forked child
        import runpy

        runpy.run_module(become.module, run_name="__main__", alter_sys=True)
