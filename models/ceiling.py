"""How much of the composer the notes carry: a ceiling for the audio classifier.

The corpus was rendered from SymbTr MIDI scores with instruments and tempi drawn independently of
the composer, so whatever identifies the composer is in the notes (and in the form, rhythmic cycle
and makam, which the notes express). This module measures how well a classifier does when it is
*given* the notes: perfect transcription, the best an audio model could hope to extract.

Features per piece, over the part of the score the corpus renders (its tempo factor, the first
90 s): a 53-bin histogram of pitches relative to the last note (koma-53, the Turkish theory's
division of the octave; SymbTr's pitch bends carry it), an interval histogram, a histogram of
durations relative to the median, up/same/down contour bigrams, range and spread, the share of
rests, notes per second and, optionally, the excerpt's length. The same features can come from the
audio (``librosa.yin`` f0 → notes), which measures what a simple transcription keeps of them.

A random forest is scored by piece-level stratified k-fold cross-validation, repeated with
shuffles: every piece is tested once per repeat, by a model that never saw it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError, check_range
from .rerender import MAX_SECONDS, open_midi, read_manifest

__all__ = ["KOMA", "score_notes", "audio_notes", "melody_features", "excerpts", "cv_accuracy", "corpus_ceiling"]

KOMA = 53  # koma-53 steps per octave
REST_SECONDS = 0.1  # a gap between notes at least this long is a rest
YIN_HOP = 256
YIN_FRAME = 1024  # 46 ms: a note is measured up to this much longer than it sounds


def score_notes(midi: bytes, tempo_factor: float = 1.0, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Notes of a monophonic SymbTr MIDI score as an ``(n, 2)`` array ``[pitch, seconds]``.

    ``pitch`` is in koma-53 steps above MIDI note 0 (each note's pitch bend applied, with the
    file's RPN bend range, 2 semitones by default); rests are ``-1``. Played at ``tempo_factor``
    × the score's tempo (as ``models.rerender`` renders it) and cut at ``max_seconds``.

    Raises
    ------
    DataError
        Not a readable MIDI file, or no notes.
    """
    m = open_midi(midi, tempo_factor)
    bend, bend_range, rpn = 0, 2.0, [None, None]
    t, start, pitch, last_end = 0.0, None, None, 0.0
    out = []
    for msg in m:  # merged tracks, times in seconds
        t += msg.time / tempo_factor
        if t > max_seconds:
            break
        if msg.type == "control_change":
            if msg.control in (101, 100):
                rpn[msg.control == 100] = msg.value
            elif msg.control == 6 and rpn == [0, 0]:
                bend_range = float(msg.value)
        elif msg.type == "pitchwheel":
            bend = msg.pitch
        elif msg.type == "note_on" and msg.velocity > 0:
            if out and t - last_end >= REST_SECONDS:
                out.append((-1.0, t - last_end))
            start, pitch = t, (msg.note + bend / 8192 * bend_range) * KOMA / 12
        elif msg.type in ("note_off", "note_on") and start is not None:
            out.append((round(pitch), t - start))
            start, last_end = None, t
    if not any(p >= 0 for p, _ in out):
        raise DataError("the score has no notes")
    return np.array(out, float)


def audio_notes(y: np.ndarray, sr: int, *, fmin: float = 55.0, fmax: float = 1400.0, min_frames: int = 3) -> np.ndarray:
    """Notes transcribed from monophonic audio, in the format of :func:`score_notes`.

    ``librosa.yin`` f0 per 256-sample hop (1024-sample frames), rounded to koma-53; frames quieter than 5 % of the
    loudest are rests; runs of one pitch (±1 koma) at least ``min_frames`` long become notes at
    their median pitch.
    Repeated notes of one pitch merge: yin cannot see a re-attack.
    """
    import librosa

    y = np.asarray(y, np.float32)
    if y.ndim != 1 or len(y) < YIN_FRAME:
        raise DataError(f"need mono audio of at least {YIN_FRAME} samples, got shape {y.shape}")
    f0 = librosa.yin(y, fmin=fmin, fmax=fmax, sr=sr, frame_length=YIN_FRAME, hop_length=YIN_HOP)
    rms = librosa.feature.rms(y=y, frame_length=YIN_FRAME, hop_length=YIN_HOP)[0][: len(f0)]
    kf = KOMA * np.log2(f0 / 440.0) + 69 * KOMA / 12
    k = np.round(kf).astype(int)
    k[rms <= 0.05 * rms.max()] = -1
    hop_s = YIN_HOP / sr
    runs = []  # [first frame's pitch, first frame, frames]
    for i, ki in enumerate(k):
        if runs and (ki == runs[-1][0] or (ki >= 0 and runs[-1][0] >= 0 and abs(ki - runs[-1][0]) <= 1)):
            runs[-1][2] += 1
        else:
            runs.append([int(ki), i, 1])
    out = []
    for p, i, n in runs:
        if n < min_frames:
            continue
        if p >= 0:  # the run's median pitch, not its first (attack) frame's
            p = int(np.round(np.median(kf[i:i + n])))
        if out and out[-1][0] == p:
            out[-1][1] += n * hop_s
        else:
            out.append([p, n * hop_s])
    if not any(p >= 0 for p, _ in out):
        raise DataError("no pitched notes found in the audio")
    return np.array(out, float)


def melody_features(notes: np.ndarray) -> np.ndarray:
    """A fixed-length description of a melody (``[pitch, seconds]`` rows, rests ``-1``): 53 + 21 + 7
    + 9 + 5 = 95 numbers, independent of key (pitches relative to the last note) and of tempo
    (durations relative to the median) except for notes per second."""
    notes = np.asarray(notes, float)
    pitched = notes[notes[:, 0] >= 0]
    if len(pitched) < 2:
        raise DataError("a melody needs at least two notes")
    p, d = pitched[:, 0].astype(int), notes[:, 1]
    rel = p - p[-1]
    hist = np.bincount(rel % KOMA, minlength=KOMA) / len(rel)
    iv = np.diff(p)
    ivh = np.histogram(np.clip(iv, -31, 31), bins=np.arange(-31.5, 32.5, 3))[0] / len(iv)
    med = np.median(d[d > 0])
    durh = np.histogram(np.log2(np.maximum(d, 1e-3) / med), bins=np.arange(-3.5, 4.5, 1))[0] / len(d)
    s = (np.sign(iv) + 1).astype(int)
    big = np.bincount(s[:-1] * 3 + s[1:], minlength=9) / max(1, len(s) - 1)
    stats = [np.ptp(rel), rel.mean(), rel.std(), np.mean(notes[:, 0] < 0), len(notes) / max(1e-3, d.sum())]
    return np.concatenate([hist, ivh, durh, big, stats])


def cv_accuracy(X: np.ndarray, y, *, groups=None, folds: int = 5, repeats: int = 3, seed: int = 0,
                trees: int = 500) -> list[float]:
    """Accuracy of a class-weighted random forest by stratified ``folds``-fold cross-validation,
    once per repeat with a different shuffle. One row per piece, or, with ``groups`` (each row's
    piece), several rows per piece that always land in the same fold."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    per_piece = y if groups is None else y[np.unique(groups, return_index=True)[1]]
    counts = np.unique(per_piece, return_counts=True)[1]
    if len(counts) < 2 or counts.min() < folds:
        raise DataError(f"{folds}-fold cross-validation needs at least {folds} pieces of each of two or more "
                        f"composers; the smallest has {counts.min()}")
    out = []
    for r in range(repeats):
        hits = 0
        cv = (StratifiedKFold if groups is None else StratifiedGroupKFold)(folds, shuffle=True, random_state=seed + r)
        for tr, te in cv.split(X, y, groups):
            clf = RandomForestClassifier(trees, class_weight="balanced", random_state=seed, n_jobs=1)
            hits += int((clf.fit(X[tr], y[tr]).predict(X[te]) == y[te]).sum())
        out.append(hits / len(y))
    return out


def excerpts(notes: np.ndarray, seconds: float) -> list[np.ndarray]:
    """Consecutive ``seconds``-long parts of a melody (a note belongs to the part it starts in).
    Parts shorter than half of ``seconds`` (the end) or with fewer than two pitched notes are left out."""
    notes = np.asarray(notes, float)
    starts = np.concatenate([[0.0], np.cumsum(notes[:, 1])[:-1]])
    part = (starts // seconds).astype(int)
    total = notes[:, 1].sum()
    out = []
    for k in range(part.max() + 1):
        p = notes[part == k]
        if total - k * seconds >= seconds / 2 and (p[:, 0] >= 0).sum() >= 2:
            out.append(p)
    return out


def _onehot(rows, key) -> np.ndarray:
    values = sorted({r[key] for r in rows})
    return np.array([[r[key] == v for v in values] for r in rows], float)


def _audio_job(args):
    import soundfile as sf

    path, max_seconds = args
    try:
        y, sr = sf.read(path, dtype="float32", always_2d=True)
        y = y.mean(axis=1)[: int(max_seconds * sr)]
        return audio_notes(y, sr), None
    except (OSError, RuntimeError, DataError) as e:
        return None, str(e)


def corpus_ceiling(corpus, midi_dir, *, audio: bool = False, folds: int = 5, repeats: int = 3, seed: int = 0,
                   trees: int = 500, excerpt: float = 0.0, jobs: int = 2, progress: bool = True) -> dict:
    """Cross-validated piece accuracy of composer classifiers given each piece's notes.

    ``corpus`` is a data set with a ``manifest.csv`` naming each piece's ``source_file`` (its
    SymbTr MIDI score), ``tempo_factor``, ``seconds``, ``form``, ``usul`` and ``makam``;
    ``midi_dir`` holds the scores. With ``audio``, the same melody features are also computed from
    the corpus's audio files (``librosa.yin``), to compare a simple transcription with the score.
    With ``excerpt`` > 0, each piece is cut into ``excerpt``-second parts (:func:`excerpts`) and
    the accuracy is over parts (the folds still split by piece); the excerpt's length is then not
    a feature.

    Returns ``{"n_pieces", "n_rows", "composers", "folds", "repeats", "trees", "excerpt", "results":
    {name: {"mean", "sd", "per_repeat"}}}`` with accuracies as fractions.
    """
    from tqdm import tqdm

    check_range("folds", folds, 2, kind=int)
    for name, value in (("repeats", repeats), ("trees", trees), ("jobs", jobs)):
        check_range(name, value, 1, kind=int)
    check_range("excerpt", excerpt, 0.0)
    corpus, midi_dir = Path(corpus), Path(midi_dir)
    rows = read_manifest(corpus, need={"path", "composer", "source_file", "tempo_factor", "seconds", "form", "usul",
                                       "makam"})
    if not midi_dir.is_dir():
        raise DataError(f"{midi_dir}: not a folder of MIDI scores")
    missing = [r["source_file"] for r in rows if not (midi_dir / r["source_file"]).is_file()]
    if missing:
        raise DataError(f"{midi_dir}: {len(missing)} scores of the manifest are missing, e.g. {missing[0]}")
    scores, bad = [], []
    for r in tqdm(rows, desc="scores", unit="piece", disable=not progress, leave=False):
        try:
            scores.append(score_notes((midi_dir / r["source_file"]).read_bytes(), float(r["tempo_factor"])))
        except DataError as e:
            bad.append(f"{r['source_file']}: {e}")
    if bad:
        raise DataError(f"{len(bad)} unusable scores: " + "; ".join(bad[:3]))
    melodies = {"score melody": scores}
    if audio:
        from concurrent.futures import ProcessPoolExecutor

        tasks = [(str(corpus / r["path"]), MAX_SECONDS) for r in rows]
        with ProcessPoolExecutor(max(1, jobs)) as ex:
            res = list(tqdm(ex.map(_audio_job, tasks, chunksize=4), total=len(tasks), desc="yin", unit="file",
                            disable=not progress, leave=False))
        bad = [f"{t[0]}: {err}" for t, (_, err) in zip(tasks, res) if err]
        if bad:
            raise DataError(f"{len(bad)} unusable audio files: " + "; ".join(bad[:3]))
        melodies["audio melody (yin)"] = [n for n, _ in res]
    y = np.array([r["composer"] for r in rows])
    length = np.array([[float(r["seconds"])] for r in rows])
    meta = np.hstack([_onehot(rows, k) for k in ("form", "usul", "makam")])
    sets = {}  # name -> (features, each row's piece)
    for name, notes in melodies.items():
        parts = [[n] if not excerpt else excerpts(n, excerpt) for n in notes]
        piece = np.array([i for i, ps in enumerate(parts) for _ in ps], np.int64)
        if len(piece) == 0:
            raise DataError(f"no piece has a {excerpt:g}-s part with two notes or more ({name})")
        X = np.array([melody_features(p) for ps in parts for p in ps])
        sets[name] = (X, piece)
        if not excerpt:
            sets[name + " + length"] = (np.hstack([X, length]), piece)
        if name == "score melody":
            sets["form + usul + makam (labels)"] = (meta[piece], piece)
            sets["score melody" + ("" if excerpt else " + length") + " + form + usul + makam"] = (
                np.hstack([X, meta[piece]] if excerpt else [X, length, meta]), piece)
    results = {}
    for name, (X, piece) in tqdm(sets.items(), desc="cross-validation", disable=not progress, leave=False):
        accs = cv_accuracy(X, y[piece], groups=piece if excerpt else None, folds=folds, repeats=repeats, seed=seed,
                           trees=trees)
        results[name] = {"mean": float(np.mean(accs)), "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                         "per_repeat": [float(a) for a in accs]}
    return {"n_pieces": len(rows), "n_rows": len(sets["score melody"][1]), "composers": sorted(set(y)),
            "folds": folds, "repeats": repeats, "trees": trees, "excerpt": excerpt, "results": results}
