"""Composer data sets: folder-per-composer scanning, piece-level splits, windows, feature cache, augmentation.

The piece is the unit of every split: all windows of a piece fall in one of train/validation/test.
Features are computed by a ``featurizer`` the caller passes in (tarab passes the live engine's
``StreamingMel.transform``), so training and inference share one feature path; ``models`` itself
never imports ``realtime``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, ParameterError

log = logging.getLogger(__name__)

__all__ = ["Item", "scan_dataset", "split_pieces", "open_audio", "load_audio", "FeatureCache", "WindowSet",
           "Augmenter", "AUDIO_EXTENSIONS", "log_mel", "AMIN_DB"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".oga", ".opus")
AMIN = 1e-10
AMIN_DB = -100.0


def log_mel(S: np.ndarray) -> np.ndarray:
    """Power → dB, as the models do it internally: ``10 log10(max(S, 1e-10))``."""
    return (10.0 * np.log10(np.maximum(S, AMIN))).astype(np.float32)


@dataclass(frozen=True)
class Item:
    """One audio file of a data set."""

    path: str  # relative to the data dir
    label: str  # composer (folder name)
    piece: str  # piece id: the unit of splitting


def scan_dataset(data_dir) -> list[Item]:
    """List the audio files of a folder-per-composer data set.

    Parameters
    ----------
    data_dir : path
        ``<data_dir>/<composer>/<file>``. If ``manifest.csv`` with columns ``path`` and
        ``piece`` exists, it names each file's piece; otherwise the file stem is the piece.

    Raises
    ------
    DataError
        No such directory, fewer than two composer folders, a folder without audio files.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    pieces = {}
    man = root / "manifest.csv"
    if man.is_file():
        with open(man, newline="") as f:
            for row in csv.DictReader(f):
                if "path" in row and row.get("piece"):
                    pieces[row["path"]] = row["piece"]
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no composer folders (expected {root}/<composer>/<audio files>)")
    items, empty = [], []
    for c in classes:
        files = sorted(f for f in c.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            empty.append(c.name)
            continue
        for f in files:
            rel = f.relative_to(root).as_posix()
            items.append(Item(rel, c.name, pieces.get(rel, f.stem)))
    if empty:
        raise DataError(f"{root}: composer folder(s) without audio files: {', '.join(empty)}")
    if len(classes) < 2:
        raise DataError(f"{root}: only one composer folder ({classes[0].name}); a classifier needs at least 2")
    return items


def split_pieces(items, seed: int = 0, val_frac: float = 0.15, test_frac: float = 0.15) -> dict:
    """Deterministic piece-level split, stratified by composer.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}`` lists of piece ids, plus ``"seed"``.

    Raises
    ------
    DataError
        A composer with fewer than 3 pieces (one each for train, validation and test).
    """
    by_label = {}
    for it in items:
        by_label.setdefault(it.label, set()).add(it.piece)
    few = {k: len(v) for k, v in by_label.items() if len(v) < 3}
    if few:
        raise DataError("each composer needs at least 3 pieces (train/validation/test are split by piece); "
                        + ", ".join(f"{k} has {n}" for k, n in sorted(few.items())))
    out = {"train": [], "val": [], "test": [], "seed": seed}
    for label in sorted(by_label):
        ps = sorted(by_label[label])
        rng = np.random.default_rng([seed, int(hashlib.sha1(label.encode()).hexdigest()[:8], 16)])
        rng.shuffle(ps)
        n_test = max(1, int(round(test_frac * len(ps))))
        n_val = max(1, int(round(val_frac * len(ps))))
        out["test"] += ps[:n_test]
        out["val"] += ps[n_test:n_test + n_val]
        out["train"] += ps[n_test + n_val:]
    return out


def open_audio(path):
    """Open an audio file with soundfile for reading (whole or in blocks).

    Raises
    ------
    DataError
        Missing, unreadable (not audio, truncated header, unsupported), channel-less or empty file.
    """
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        f = sf.SoundFile(str(p))
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError, ValueError) as e:
        msg = str(e).split(": ", 1)[-1] if str(e) else type(e).__name__
        raise DataError(f"{p}: not a readable audio file ({msg})") from None
    if f.channels < 1:
        f.close()
        raise DataError(f"{p}: has no audio channels")
    if f.frames == 0:
        f.close()
        raise DataError(f"{p}: contains no audio samples")
    return f


def load_audio(path, sr: int) -> np.ndarray:
    """Read an audio file as mono float32 at ``sr`` (soundfile, then soxr if the rate differs).

    Raises
    ------
    DataError
        As :func:`open_audio`, plus read errors and NaN/Inf samples.
    """
    import soundfile as sf

    with open_audio(path) as f:
        file_sr = f.samplerate
        try:
            y = f.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise DataError(f"{path}: read error ({e})") from None
    if not np.isfinite(y).all():
        raise DataError(f"{path}: audio has NaN or Inf samples")
    y = y.mean(axis=1) if y.shape[1] > 1 else y[:, 0]
    if file_sr != sr:
        import soxr

        y = soxr.resample(y, file_sr, sr, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(y, np.float32)


class FeatureCache:
    """Log-mel features per file, computed once with ``featurizer`` and cached as .npy (float16).

    Parameters
    ----------
    data_dir : path
    cache_dir : path
        Where the .npy files go (the data dir may be read-only).
    featurizer : callable(np.ndarray) -> np.ndarray [shape=(n_mels, t)]
        Mel power spectrogram of a mono signal.
    config : dict
        Everything the features depend on (mel parameters); part of the cache key.
    """

    def __init__(self, data_dir, cache_dir, featurizer, config: dict):
        self.data_dir = Path(data_dir)
        self.cache_dir = Path(cache_dir)
        self.featurizer = featurizer
        self.config = dict(config)
        self.sr = int(config["sr"])
        self.key = hashlib.sha1(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:12]

    def _path(self, item: Item) -> Path:
        st = (self.data_dir / item.path).stat()
        h = hashlib.sha1(f"{item.path}|{st.st_size}|{st.st_mtime_ns}|{self.key}".encode()).hexdigest()[:16]
        return self.cache_dir / self.key / f"{h}.npy"

    def get(self, item: Item) -> np.ndarray:
        """Log-mel [dB] of one file, shape (n_mels, t), float16."""
        p = self._path(item)
        if p.is_file():
            try:
                return np.load(p)
            except (OSError, ValueError):
                log.warning("feature cache file %s unreadable; recomputing", p)
        y = load_audio(self.data_dir / item.path, self.sr)
        X = log_mel(self.featurizer(y)).astype(np.float16)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp.npy")
        np.save(tmp, X)
        os.replace(tmp, p)
        return X

    def load_all(self, items, progress: bool = True) -> tuple[dict, list]:
        """Features of every item: ``({path: array}, skipped)``; unreadable files are skipped and listed."""
        from tqdm import tqdm

        feats, skipped = {}, []
        for it in tqdm(items, desc="features", unit="file", disable=not progress, leave=False):
            try:
                feats[it.path] = self.get(it)
            except DataError as e:
                skipped.append((it.path, str(e)))
        if skipped:
            log.warning("skipped %d unreadable file(s): %s", len(skipped), "; ".join(p for p, _ in skipped))
        return feats, skipped


class WindowSet:
    """Fixed-length windows over per-file log-mel arrays.

    Parameters
    ----------
    items : list of Item
    feats : dict path -> np.ndarray [shape=(n_mels, t)]
    labels : list of str
        Class order.
    window_frames : int
    hop_frames : int
        Frames between window starts. A file shorter than a window yields one window, padded
        with the floor value (-100 dB, silence).
    """

    def __init__(self, items, feats, labels, window_frames: int, hop_frames: int):
        if window_frames <= 0 or hop_frames <= 0:
            raise ParameterError(f"window_frames/hop_frames must be > 0, got {window_frames}/{hop_frames}")
        self.labels = list(labels)
        self.window_frames = window_frames
        self.items = [it for it in items if it.path in feats]
        self.feats = feats
        index = []
        for i, it in enumerate(self.items):
            t = feats[it.path].shape[1]
            starts = range(0, max(1, t - window_frames + 1), hop_frames)
            index += [(i, s) for s in starts]
        self.index = np.array(index, np.int64).reshape(-1, 2)
        self.y = np.array([self.labels.index(self.items[i].label) for i, _ in self.index], np.int64)
        self.piece_of = np.array([self.items[i].piece for i, _ in self.index], dtype=object)

    def __len__(self):
        return len(self.index)

    def subset(self, rows) -> "WindowSet":
        """A view with only the windows ``rows`` (same items and features)."""
        ws = object.__new__(WindowSet)
        ws.labels, ws.window_frames, ws.items, ws.feats = self.labels, self.window_frames, self.items, self.feats
        rows = np.asarray(rows, np.int64)
        ws.index, ws.y, ws.piece_of = self.index[rows], self.y[rows], self.piece_of[rows]
        return ws

    def window(self, j: int, length: int | None = None, start_jitter: int = 0) -> np.ndarray:
        """Window ``j`` (float32, (n_mels, length)), optionally longer/shifted for augmentation."""
        L = length or self.window_frames
        i, s = self.index[j]
        X = self.feats[self.items[i].path]
        s = int(np.clip(s + start_jitter, 0, max(0, X.shape[1] - L)))
        w = X[:, s:s + L].astype(np.float32)
        if w.shape[1] < L:
            w = np.pad(w, ((0, 0), (0, L - w.shape[1])), constant_values=AMIN_DB)
        return w

    def class_weights(self) -> np.ndarray:
        counts = np.bincount(self.y, minlength=len(self.labels)).astype(np.float64)
        w = counts.sum() / np.maximum(counts, 1) / len(self.labels)
        return w.astype(np.float32)


class Augmenter:
    """On-the-fly augmentation of log-mel windows.

    Pitch shift (±``max_semitones``, resampling the mel axis), time stretch (``stretch`` range,
    resampling the time axis), random EQ (a smooth random curve of up to ±``eq_db`` across the
    bands, so the model cannot lean on an instrument's spectral envelope), gain (±``gain_db``),
    added noise (SNR in ``snr_db``), SpecAugment frequency masks (up to ``freq_mask`` bins) and
    time masks (up to ``time_mask`` frames).
    """

    def __init__(self, sr, n_fft, n_mels, fmin=0.0, fmax=None, *, max_semitones=2.0, stretch=(0.9, 1.1),
                 eq_db=12.0, gain_db=6.0, snr_db=(10.0, 40.0), noise_prob=0.3, freq_mask=30, time_mask=20, seed=0):
        import librosa

        self.mel_hz = librosa.mel_frequencies(n_mels=n_mels, fmin=fmin, fmax=fmax or sr / 2)
        self.n_mels = n_mels
        self.max_semitones = max_semitones
        self.stretch = stretch
        self.gain_db = gain_db
        self.eq_db = eq_db
        self._eq_basis = np.cos(np.pi * np.outer(np.arange(1, 5), np.linspace(0, 1, n_mels)))  # (4, n_mels)
        self.snr_db = snr_db
        self.noise_prob = noise_prob
        self.freq_mask = freq_mask
        self.time_mask = time_mask
        self.rng = np.random.default_rng(seed)

    def source_length(self, window_frames: int) -> tuple[int, float]:
        """Draw a time-stretch rate and the number of source frames it needs."""
        rate = self.rng.uniform(*self.stretch)
        return max(2, int(round(window_frames * rate))), rate

    def __call__(self, w: np.ndarray, window_frames: int) -> np.ndarray:
        rng = self.rng
        # time stretch: resample `w` (source length) to window_frames
        if w.shape[1] != window_frames:
            src = np.linspace(0, w.shape[1] - 1, window_frames)
            i0 = np.floor(src).astype(int)
            i1 = np.minimum(i0 + 1, w.shape[1] - 1)
            f = (src - i0).astype(np.float32)
            w = w[:, i0] * (1 - f) + w[:, i1] * f
        # pitch shift: band b takes the value at frequency hz[b] / 2^(s/12)
        s = rng.uniform(-self.max_semitones, self.max_semitones)
        if abs(s) > 1e-3:
            src_hz = self.mel_hz / 2.0 ** (s / 12.0)
            pos = np.interp(src_hz, self.mel_hz, np.arange(self.n_mels))
            i0 = np.floor(pos).astype(int)
            i1 = np.minimum(i0 + 1, self.n_mels - 1)
            f = (pos - i0).astype(np.float32)[:, None]
            w = w[i0] * (1 - f) + w[i1] * f
        w = w + rng.uniform(-self.gain_db, self.gain_db)
        if self.eq_db > 0:
            curve = rng.uniform(-1, 1, 4) @ self._eq_basis
            w = w + (self.eq_db * curve / max(1.0, np.abs(curve).max()))[:, None].astype(np.float32)
        if rng.random() < self.noise_prob:
            level = w.mean() - rng.uniform(*self.snr_db)
            tilt = np.linspace(0.0, -12.0, self.n_mels)[:, None]  # pinkish
            noise_db = level + tilt + rng.normal(0, 2.0, size=w.shape)
            w = 10.0 * np.log10(10.0 ** (w / 10.0) + 10.0 ** (noise_db / 10.0))
        fill = float(w.mean())
        for _ in range(2):
            m = int(rng.integers(0, self.freq_mask + 1))
            if m:
                b = int(rng.integers(0, self.n_mels - m + 1))
                w[b:b + m] = fill
            t = int(rng.integers(0, self.time_mask + 1))
            if t:
                a = int(rng.integers(0, window_frames - t + 1))
                w[:, a:a + t] = fill
        return np.maximum(w, AMIN_DB).astype(np.float32)


def save_split(split: dict, path) -> None:
    Path(path).write_text(json.dumps(split, indent=1) + "\n")


def describe(items) -> dict:
    """Counts per composer (files, pieces) for logs and cards."""
    out = {}
    for it in items:
        d = out.setdefault(it.label, {"files": 0, "pieces": set()})
        d["files"] += 1
        d["pieces"].add(it.piece)
    return {k: {"files": v["files"], "pieces": len(v["pieces"])} for k, v in sorted(out.items())}


