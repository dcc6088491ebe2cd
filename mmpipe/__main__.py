"""``mmpipe`` and ``python -m mmpipe``: run the command, then leave without the teardown."""
import atexit
import sys
import threading

from mmpipe.cli import main


def entry() -> None:
    """The ``mmpipe`` command. After it, Python's own exit would tear down every module, which
    takes 0.5 s once torch is loaded (on every run, for nothing): do what that exit does that
    matters (wait for non-daemon threads, run the atexit handlers, logging's flush among them;
    flush stdout and stderr), then leave. An exception escaping ``main`` exits as usual."""
    code = main()
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    from mmpipe.launch import exit_now

    exit_now(code)


if __name__ == "__main__":
    sys.exit(entry())
