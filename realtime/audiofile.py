"""Writing audio files: format from the extension, atomic (a complete file or none)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from models.errors import ParameterError, TarabError

from .atomic import atomic_output, check_writable

__all__ = ["FORMATS", "check_audio_path", "write_audio", "AudioWriter", "peak_safe"]

FORMATS = {".wav": ("WAV", "FLOAT"), ".flac": ("FLAC", "PCM_24"), ".ogg": ("OGG", "VORBIS"),
           ".aiff": ("AIFF", "FLOAT"), ".aif": ("AIFF", "FLOAT"), ".mp3": ("MP3", "MPEG_LAYER_III")}


def check_audio_path(path, force: bool = False) -> Path:
    """Refuse, before any work, an output name whose format is unknown or that cannot be written."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise ParameterError(f"{p}: unknown audio format {p.suffix or '(no extension)'!r}; "
                             f"use one of {', '.join(sorted(FORMATS))}")
    return check_writable(p, force)


class AudioWriter:
    """Stream blocks into an audio file atomically: ``with AudioWriter(...) as w: w.write(block)``.

    The file appears under its name only when the ``with`` block ends without an error. Blocks are
    float32, shape (n,) or (n, channels); values are clipped to [-1, 1] for integer/lossy formats.
    """

    def __init__(self, path, sr: int, channels: int = 1, force: bool = False):
        self.path = check_audio_path(path, force)
        self.sr, self.channels, self.force = int(sr), int(channels), force
        self.frames = 0

    def __enter__(self):
        import soundfile as sf

        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_output(self.path, self.force))
        fmt, subtype = FORMATS[self.path.suffix.lower()]
        self._float = subtype == "FLOAT"
        try:
            self._f = sf.SoundFile(str(tmp), "w", samplerate=self.sr, channels=self.channels, format=fmt,
                                   subtype=subtype)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            self._stack.__exit__(type(e), e, None)
            raise TarabError(f"{self.path}: cannot write this format here ({e})") from None
        return self

    def write(self, block: np.ndarray) -> None:
        b = np.asarray(block, np.float32)
        if not self._float:
            b = np.clip(b, -1.0, 1.0)
        self._f.write(b)
        self.frames += b.shape[0]

    def __exit__(self, et, ev, tb):
        close_error = None
        try:
            self._f.close()
        except Exception as e:  # a failing final flush (e.g. disk full) must not leave a file
            close_error = e
        if et is None and close_error is not None:
            self._stack.__exit__(type(close_error), close_error, None)  # removes the temporary file
            raise TarabError(f"{self.path}: writing failed ({close_error}); no file written") from None
        if et is not None:
            self._stack.__exit__(et, ev, tb)
            if isinstance(ev, OSError):
                raise TarabError(f"{self.path}: writing failed ({ev}); no file written") from None
            return False
        self._stack.__exit__(None, None, None)
        return False


def write_audio(path, y: np.ndarray, sr: int, force: bool = False) -> Path:
    """Write a whole signal (float32, (n,) or (n, channels)) atomically; format from the extension."""
    y = np.asarray(y, np.float32)
    with AudioWriter(path, sr, 1 if y.ndim == 1 else y.shape[1], force) as w:
        w.write(y)
    return w.path


def peak_safe(y: np.ndarray, ceiling_db: float = -1.0) -> tuple[np.ndarray, float]:
    """Scale a whole clip down so its peak is at most ``ceiling_db`` dBFS; returns (clip, gain dB ≤ 0)."""
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    ceiling = 10.0 ** (ceiling_db / 20.0)
    if peak <= ceiling:
        return y, 0.0
    g = ceiling / peak
    return (y * g).astype(np.float32), float(20.0 * np.log10(g))
