"""Render the corpus's pieces again with other instruments: training data that does not teach timbre.

symbtr8 renders every piece once, with one General-MIDI program picked by a hash of the piece
name. On a test split of ~47 pieces that choice is by chance associated with the composer, and a
classifier trained on one instrument per piece learns the instrument (measured: its predictions
share 3× more information with the GM program than with the composer). Rendering each *training*
piece with every program of the corpus removes that shortcut: within a composer, every instrument
occurs equally often.

The recipe is the corpus's own (its README, "How it was rendered"): the SymbTr MIDI score with its
tempo scaled by the piece's tempo factor, FluidSynth with the FluidR3_GM soundfont at 22050 Hz
(reverb and chorus at FluidSynth defaults), mixed to mono, leading and trailing silence below
-50 dB of the peak trimmed, capped at 90 s with a 50 ms fade-out, peaked at -1 dBFS, OGG Vorbis.
Rendered with the piece's own program, this reproduces the corpus file (a test checks it).

The output is a folder-per-composer data set whose ``manifest.csv`` gives each file the *same
piece id* as the corpus, so a piece-level split sends all renders of a piece to the same side.
``tarab train --extra-train DIR`` adds only the renders of training pieces.

Needs ``fluidsynth`` and a GM soundfont (Debian: ``apt-get install fluidsynth fluid-soundfont-gm``)
and the SymbTr MIDI files (``git clone https://github.com/MTG/SymbTr``; the corpus used commit
246bbe362ef1; the files are in its ``midi/`` folder).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import DataError, ParameterError

log = logging.getLogger(__name__)

__all__ = ["GM_PROGRAMS", "SOUNDFONTS", "voice_and_retime", "finish", "render_midi", "rerender_corpus", "other_piece_rows",
           "find_soundfont"]

GM_PROGRAMS = (24, 40, 42, 46, 71, 73, 104, 107)  # the corpus's: nylon guitar, violin, cello, harp,
#                                                  clarinet, flute, sitar, koto
SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2",)
SR = 22050
TRIM_DB = -50.0
MAX_SECONDS = 90.0
FADE_SECONDS = 0.05
PEAK_DBFS = -1.0
MIN_SECONDS = 5.0  # the corpus left out shorter renders
MANIFEST_FIELDS = ("path", "composer", "piece", "gm_program", "tempo_factor", "seconds", "source_file")


def find_soundfont(path=None) -> Path:
    """The soundfont to render with: ``path`` if given, else FluidR3_GM where Debian installs it.

    Raises
    ------
    DataError
        The file does not exist.
    """
    for cand in ([path] if path else SOUNDFONTS):
        if Path(cand).is_file():
            return Path(cand)
    raise DataError(f"no soundfont at {path or SOUNDFONTS[0]} (Debian: apt-get install fluid-soundfont-gm)")


def _fluidsynth() -> str:
    """Path of the ``fluidsynth`` executable; DataError if it is not installed."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise DataError("fluidsynth is not installed (Debian: apt-get install fluidsynth)")
    return exe


def open_midi(midi: bytes, tempo_factor: float = 1.0):
    """``mido.MidiFile`` of ``midi`` bytes, after checking the tempo factor it is to be played at.

    Raises ParameterError (a non-positive tempo factor) or DataError (not a readable MIDI file).
    """
    import mido

    if not tempo_factor > 0:
        raise ParameterError(f"tempo factor must be > 0, got {tempo_factor}")
    try:
        return mido.MidiFile(file=io.BytesIO(midi))
    except (OSError, EOFError, ValueError, KeyError, IndexError) as e:
        raise DataError(f"not a readable MIDI file ({e})") from None


def voice_and_retime(midi: bytes, program: int, tempo_factor: float) -> bytes:
    """A MIDI file played by GM ``program`` at ``tempo_factor`` × its tempo.

    Every ``set_tempo`` is divided by the factor (so 1.1 plays 10 % faster), every existing
    ``program_change`` is set to ``program``, and each track with notes starts with a program
    change on each of its channels (SymbTr files have none: they would play the default piano).

    Raises
    ------
    ParameterError
        ``program`` outside 0..127 or a non-positive tempo factor.
    DataError
        Not a readable MIDI file.
    """
    import mido

    if not 0 <= int(program) <= 127:
        raise ParameterError(f"GM program must be 0..127, got {program}")
    m = open_midi(midi, tempo_factor)
    for tr in m.tracks:
        channels = set()
        for msg in tr:
            if msg.type == "set_tempo":
                msg.tempo = max(1, int(round(msg.tempo / tempo_factor)))
            elif msg.type == "program_change":
                msg.program = int(program)
            if msg.type == "note_on":
                channels.add(msg.channel)
        for c in sorted(channels, reverse=True):
            tr.insert(0, mido.Message("program_change", channel=c, program=int(program), time=0))
    out = io.BytesIO()
    m.save(file=out)
    return out.getvalue()


def finish(y: np.ndarray, sr: int = SR) -> np.ndarray:
    """The corpus's post-processing of a mono render (float32 out).

    Leading and trailing samples below -50 dB of the peak are trimmed, the result is capped at
    90 s with a 50 ms linear fade-out when capped, and peak-normalised to -1 dBFS.

    Raises
    ------
    DataError
        A silent render (no sample above 0).
    """
    y = np.asarray(y, np.float32)
    peak = float(np.abs(y).max()) if y.size else 0.0
    if not peak > 0:
        raise DataError("the render is silent")
    loud = np.flatnonzero(np.abs(y) > peak * 10 ** (TRIM_DB / 20))
    y = y[loud[0]:loud[-1] + 1]
    n_max = int(MAX_SECONDS * sr)
    if y.size > n_max:
        y = y[:n_max].copy()
        n_fade = int(FADE_SECONDS * sr)
        y[-n_fade:] *= np.linspace(1.0, 0.0, n_fade, dtype=np.float32)
    return (y * (10 ** (PEAK_DBFS / 20) / np.abs(y).max())).astype(np.float32)


def render_midi(midi: bytes, *, soundfont, sr: int = SR) -> np.ndarray:
    """Render MIDI bytes with FluidSynth (defaults for reverb and chorus), mixed to mono, float32.

    Raises
    ------
    DataError
        ``fluidsynth`` is missing or fails.
    """
    import soundfile as sf

    exe = _fluidsynth()
    with tempfile.TemporaryDirectory(prefix="tarab-render-") as tmp:
        mid, wav = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        mid.write_bytes(midi)
        r = subprocess.run([exe, "-n", "-i", "-q", "-r", str(sr), "-F", str(wav), str(soundfont), str(mid)],
                           capture_output=True, text=True)
        if r.returncode != 0 or not wav.is_file():
            last = ((r.stderr or r.stdout).strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise DataError(f"fluidsynth failed: {last}")
        y, file_sr = sf.read(str(wav), dtype="float32", always_2d=True)
    if file_sr != sr:
        raise DataError(f"fluidsynth wrote {file_sr} Hz, asked for {sr}")
    return y.mean(axis=1)


MANIFEST_NEEDS = frozenset({"path", "composer", "piece", "gm_program", "tempo_factor", "source_file"})


def read_manifest(corpus: Path, need=MANIFEST_NEEDS) -> list[dict]:
    """The rows of ``corpus/manifest.csv``; DataError if it is missing or lacks a column of ``need``."""
    man = Path(corpus) / "manifest.csv"
    if not man.is_file():
        raise DataError(f"{corpus}: no manifest.csv (it names each file's piece, program, tempo and MIDI source)")
    with open(man, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not set(need) <= set(rows[0]):
        raise DataError(f"{man}: needs the columns {', '.join(sorted(need))}")
    return rows


def _piece_key(stem: str):
    """(composer, title) of a SymbTr score name ``makam--form--usul--title--composer``; untitled and
    numbered pieces (peşrevs, seyirs: ``--1``) are keyed by makam and form instead."""
    f = stem.split("--")
    title = f[3] if len(f) > 4 else ""
    return (f[-1], "title", title) if title and not title.isdigit() else (f[-1], "makam+form", f[0], f[1])


def _tempo_factor(name: str) -> float:
    """A tempo factor in [0.85, 1.15] from a hash of the score name: independent of the composer."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return round(0.85 + 0.3 * h / 2 ** 64, 4)


def other_piece_rows(rows: list[dict], midi_dir: Path, per_composer: int) -> list[dict]:
    """Manifest rows for SymbTr scores of the corpus's composers that are *not* in the corpus.

    Left out: the corpus's own scores, and scores that share a title with a corpus piece of the
    same composer (or, untitled or numbered, its makam and form): they may be versions of it.
    Up to ``per_composer`` per composer, in name order. The piece id is the score name, so these
    pieces can never share an id with a corpus piece.
    """
    composers = {r["composer"] for r in rows}
    own = {r["source_file"] for r in rows}
    near = {_piece_key(Path(r["source_file"]).stem) for r in rows}
    out, n = [], {}
    for f in sorted(midi_dir.glob("*.mid")):
        stem = f.stem
        comp = stem.split("--")[-1]
        if comp not in composers or f.name in own or _piece_key(stem) in near or stem.count("--") < 4:
            continue
        if n.get(comp, 0) >= per_composer:
            continue
        n[comp] = n.get(comp, 0) + 1
        out.append({"path": f"{comp}/{stem.rsplit('--', 1)[0]}.ogg", "composer": comp, "piece": stem,
                    "gm_program": "-1", "tempo_factor": f"{_tempo_factor(stem.rsplit('--', 1)[0]):.4f}",
                    "source_file": f.name})
    return out


def rerender_corpus(corpus_dir, midi_dir, out_dir, *, programs=GM_PROGRAMS, pieces=None, include_own: bool = False,
                    other_pieces: int = 0, soundfont=None, jobs: int = 2, progress: bool = True) -> dict:
    """Render the corpus's pieces with each of ``programs`` into a folder-per-composer data set.

    With ``other_pieces`` > 0, render instead up to that many SymbTr scores per composer that are
    not in the corpus (:func:`other_piece_rows`), each with every one of ``programs``, each at a
    tempo factor drawn from its name: more *pieces* to train on (``tarab train --other-train``).
    Renders under 5 s are left out, as the corpus left them out.

    Parameters
    ----------
    corpus_dir : path
        The corpus (``manifest.csv`` with path, composer, piece, gm_program, tempo_factor, source_file).
    midi_dir : path
        Folder with the MIDI files named in the manifest's ``source_file`` (SymbTr's ``midi/``).
    out_dir : path
        Written as ``<out_dir>/<composer>/<file stem>.gm<program>.ogg`` plus ``manifest.csv``
        with the corpus's piece ids. Files already there are kept (a stopped run continues).
    programs : iterable of int
        GM programs. The piece's own program is skipped unless ``include_own`` (the corpus has it).
    pieces : set of str, optional
        Render only these piece ids (e.g. a split's training pieces).
    jobs : int
        FluidSynth processes at once.

    Returns
    -------
    dict
        ``{"rendered": n, "kept": n, "short": n, "files": n, "failed": [(file, reason)], "seconds": audio
        seconds, "manifest": path}`` (``short``: other pieces' renders under 5 s, left out).

    Raises
    ------
    DataError
        Missing corpus manifest, MIDI folder, soundfont or fluidsynth; a ``pieces`` id not in the corpus.
    ParameterError
        A program outside 0..127 or ``jobs`` < 1.
    """
    import soundfile as sf
    from tqdm import tqdm

    if other_pieces < 0:
        raise ParameterError(f"other_pieces must be >= 0, got {other_pieces}")
    if other_pieces and pieces is not None:
        raise ParameterError("other_pieces renders pieces outside the corpus; it takes no list of corpus pieces")
    corpus, midi_dir, out = Path(corpus_dir), Path(midi_dir), Path(out_dir)
    rows = read_manifest(corpus)
    if not midi_dir.is_dir():
        raise DataError(f"{midi_dir}: not a directory (the SymbTr midi/ folder)")
    sf2 = find_soundfont(soundfont)
    _fluidsynth()
    programs = [int(p) for p in programs]
    if not programs or any(not 0 <= p <= 127 for p in programs):
        raise ParameterError(f"GM programs must be 0..127, got {programs}")
    if jobs < 1:
        raise ParameterError(f"jobs must be >= 1, got {jobs}")
    if other_pieces:
        rows = other_piece_rows(rows, midi_dir, other_pieces)
    if pieces is not None:
        pieces = set(pieces)
        unknown = pieces - {r["piece"] for r in rows}
        if unknown:
            raise DataError(f"{len(unknown)} piece id(s) not in {corpus}/manifest.csv, e.g. {sorted(unknown)[0]}")
        rows = [r for r in rows if r["piece"] in pieces]

    tasks = []
    for r in rows:
        for p in programs:
            if p == int(r["gm_program"]) and not include_own:
                continue
            rel = f"{r['composer']}/{Path(r['path']).stem}.gm{p}.ogg"
            tasks.append((r, p, rel))

    def one(task):
        r, p, rel = task
        dst = out / rel
        if dst.is_file():
            return rel, "kept", sf.info(str(dst)).duration
        src = midi_dir / r["source_file"]
        if not src.is_file():
            return rel, f"no MIDI file {src}", 0.0
        try:
            midi = voice_and_retime(src.read_bytes(), p, float(r["tempo_factor"]))
            y = finish(render_midi(midi, soundfont=sf2))
        except DataError as e:
            return rel, str(e), 0.0
        if other_pieces and y.size < MIN_SECONDS * SR:
            return rel, "short", 0.0
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{threading.get_ident()}.tmp")
        try:
            sf.write(str(tmp), y, SR, format="OGG", subtype="VORBIS")
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return rel, "rendered", y.size / SR

    done, failed, counts, total_s = {}, [], {"rendered": 0, "kept": 0, "short": 0}, 0.0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for (r, p, rel), (_, status, secs) in tqdm(zip(tasks, pool.map(one, tasks)), total=len(tasks),
                                                   desc="rendering", unit="file", disable=not progress):
            if status == "short":
                counts["short"] += 1
            elif status in counts:
                counts[status] += 1
                total_s += secs
                done[rel] = (r, p, secs)
            else:
                failed.append((rel, status))
    if failed:
        log.warning("%d render(s) failed: %s", len(failed), "; ".join(f"{a} ({b})" for a, b in failed[:5]))
    man = out / "manifest.csv"
    if done:
        out.mkdir(parents=True, exist_ok=True)
        old = {}
        if man.is_file():  # keep the rows of earlier runs (other pieces or programs)
            with open(man, newline="") as f:
                old = {row["path"]: row for row in csv.DictReader(f) if (out / row["path"]).is_file()}
        for rel, (r, p, secs) in done.items():
            old[rel] = {"path": rel, "composer": r["composer"], "piece": r["piece"], "gm_program": p,
                        "tempo_factor": r["tempo_factor"], "seconds": f"{secs:.3f}", "source_file": r["source_file"]}
        tmp = man.with_name(".manifest.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            w.writeheader()
            for rel in sorted(old):
                w.writerow({k: old[rel][k] for k in MANIFEST_FIELDS})
        os.replace(tmp, man)
    return {**counts, "files": len(done), "failed": failed, "seconds": round(total_s, 1), "manifest": str(man)}
