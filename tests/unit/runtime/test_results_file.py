"""results.jsonl and Ctrl-C: a signal that arrives while a result is written takes effect
after the line and its record are both done, so an interrupted run's summary counts exactly
the lines on disk. Python runs handlers in the main thread whichever thread the kernel
handed the signal to, which is what this test arranges (a helper thread sends it)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mmpipe.runtime.results import Result, ResultsFile


def test_a_signal_during_a_write_waits_for_the_line_and_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = ResultsFile(tmp_path)
    real = ResultsFile._append

    def append_then_signal(self: ResultsFile, text: str) -> None:
        real(self, text)
        helper = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
        helper.start()
        helper.join()
        time.sleep(0.05)  # let the kernel run the C-level handler wherever it delivered it

    monkeypatch.setattr(ResultsFile, "_append", append_then_signal)
    # Python's own handler, whatever an earlier in-process CLI test left installed
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            out.write(Result("r0", {"index": 0}, outputs={"y": 1}))
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    out.close()
    assert [r.id for r in out.written] == ["r0"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1
    assert restored is signal.default_int_handler
