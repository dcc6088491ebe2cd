"""Sample-level audio helpers shared by ``audio.py``: ``AudioError``, the non-finite
check, ``to_mono`` (the one mono + resample step), and ``LongAudio``, a recording too
long to hold in memory, read one window at a time.

``audio.load`` returns a ``LongAudio`` for files longer than ``STREAM_AFTER_S``
(``audio.py``); ``audio.log_mel`` plans windows from its per-frame statistics (one
streaming pass, which also rejects NaN/inf samples) and reads each window's samples
when it makes that window's features.
"""
from __future__ import annotations

import math
from typing import Any

_BLOCK_S = 30  # seconds read per block in the one pass over the file


class AudioError(ValueError):
    """A request's audio file cannot be used (missing, empty, corrupt, unsupported)."""


def nonfinite(wave: Any, channel_dim: int | None = None) -> int:
    """Frames of ``wave`` with NaN or inf in any channel (each carries into the channels'
    average, as when the mono mix was counted), which would turn every feature NaN."""
    bad = ~wave.isfinite()
    return int((bad.any(dim=channel_dim) if channel_dim is not None else bad).sum())


def check_file_finite(bad: int, path: str) -> None:
    """Float files can hold NaN or inf: fail the request, naming the file."""
    if bad:
        raise AudioError(f"audio file holds {bad} NaN or infinite samples: {path}")


def to_mono(wave: Any, channel_dim: int | None, src_rate: int, sample_rate: int) -> Any:
    """Float32 samples (channels on ``channel_dim``; None: already mono) averaged to mono,
    then resampled from ``src_rate`` to ``sample_rate`` with torchaudio's defaults. Every
    reader goes through here so files, streamed windows and in-memory audio match bit for bit."""
    if channel_dim is not None:
        wave = wave.mean(dim=channel_dim)
    if src_rate != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(wave, orig_freq=int(src_rate), new_freq=sample_rate)
    return wave


class LongAudio:
    """A long recording read lazily as mono float32 at ``sample_rate``.

    Picklable (a path and sizes, no open handle). ``frame_stats`` makes one streaming
    pass for window planning; ``read(start, end)`` reads one window's samples.
    """

    def __init__(self, path: str, sample_rate: int, src_rate: int, src_frames: int) -> None:
        self.path, self.sample_rate, self.src_rate, self.src_frames = path, sample_rate, src_rate, src_frames
        self.n = src_frames if src_rate == sample_rate else math.ceil(src_frames * sample_rate / src_rate)
        g = math.gcd(src_rate, sample_rate)
        self._q_src, self._q_out = src_rate // g, sample_rate // g  # q_src source samples = q_out output ones
        self._stats: dict[int, tuple[Any, Any]] = {}

    @property
    def shape(self) -> tuple[int]:
        return (self.n,)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stats": {}}  # the stats are cheap to remake, and large

    def _read_src(self, s0: int, s1: int) -> Any:
        """Source samples [s0, s1) as mono float32 at the target rate (resampled per call)."""
        import soundfile as sf
        import torch

        with sf.SoundFile(self.path) as f:
            f.seek(s0)
            data = f.read(s1 - s0, dtype="float32", always_2d=True)
        return to_mono(torch.from_numpy(data), 1, self.src_rate, self.sample_rate)

    def read(self, start: int, end: int) -> Any:
        """Samples [start, end) at the target rate (zeros past the end, as slicing would not)."""
        import torch

        if self.src_rate == self.sample_rate:
            return self._read_src(start, min(end, self.n)).contiguous()
        # Read whole resampling periods, with a margin so the filter sees context on both sides.
        pad = self.sample_rate // 100
        k0 = max(0, start - pad) // self._q_out
        k1 = -(-(min(end, self.n) + pad) // self._q_out)
        wave = self._read_src(k0 * self._q_src, min(self.src_frames, k1 * self._q_src))
        out = wave[start - k0 * self._q_out: end - k0 * self._q_out]
        want = min(end, self.n) - start
        return torch.nn.functional.pad(out, (0, max(0, want - out.shape[0]))).contiguous()

    def frame_stats(self, frame: int) -> tuple[Any, Any]:
        """Per ``frame`` samples: RMS (whole frames only, as ``plan_windows`` on a tensor)
        and peak (the last partial frame too), from one pass over the file in blocks.
        Raises ``AudioError`` if any sample is NaN or inf: this pass is the first to see
        every sample, and a NaN would make the loudness NaN and the window plan wrong."""
        import torch

        if frame not in self._stats:
            # Blocks of whole frames and whole resampling periods: no carry between blocks.
            block = max(1, _BLOCK_S * self.sample_rate // (frame * self._q_out)) * frame * self._q_out
            whole = self.n // frame
            # Written in place: small per-block results allocated between the blocks'
            # large temporaries fragment the heap, and RSS grew with the file's length.
            rms, peak = torch.empty(whole), torch.empty(-(-self.n // frame))
            bad = 0
            for a in range(0, self.n, block):
                w = self.read(a, min(self.n, a + block))
                bad += nonfinite(w)  # at the target rate: resampling spreads a NaN to its neighbours
                i, k = a // frame, w.shape[0] // frame
                f = w[: k * frame].view(k, frame)
                torch.sqrt(f.square().mean(1), out=rms[i:i + k])
                torch.amax(f.abs(), 1, out=peak[i:i + k])
                if w.shape[0] > k * frame:  # the file's last, partial frame
                    peak[i + k] = w[k * frame:].abs().max()
            check_file_finite(bad, self.path)  # the whole count, before any stats are kept
            self._stats[frame] = (rms, peak)
        return self._stats[frame]

    def peak(self, start: int, end: int, frame: int) -> float:
        """The loudest sample of [start, end), to frame resolution."""
        return float(self.frame_stats(frame)[1][start // frame: -(-end // frame)].max())
