"""models.ceiling: notes from SymbTr MIDI and from audio, melody features, the cross-validated ceiling."""

import csv
import io
import json

import mido
import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, run_cli
from models.ceiling import KOMA, YIN_FRAME, YIN_HOP, audio_notes, cv_accuracy, excerpts, melody_features, score_notes
from models.errors import DataError

DATA = REPO / "tests" / "data"
PIECE = "arazbar--seyir--sofyan--1--erol_bingol"
SR = 22050


def _hz(koma):
    return 440.0 * 2 ** ((koma - 69 * KOMA / 12) / KOMA)


def _midi(notes, bpm=120):
    """A SymbTr-style monophonic MIDI file: ``notes`` = [(koma, beats)], koma as float; a pitch bend
    (range 2 semitones, set by RPN 0) before each note carries the microtone."""
    m = mido.MidiFile(ticks_per_beat=480)
    tr = mido.MidiTrack()
    m.tracks.append(tr)
    tr.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm)))
    for c, v in ((101, 0), (100, 0), (6, 2), (38, 0)):
        tr.append(mido.Message("control_change", control=c, value=v))
    for k, beats in notes:
        semis = k * 12 / KOMA
        note = int(round(semis))
        tr.append(mido.Message("pitchwheel", pitch=int(round((semis - note) / 2 * 8192))))
        tr.append(mido.Message("note_on", note=note, velocity=96))
        tr.append(mido.Message("note_off", note=note, velocity=64, time=int(beats * 480)))
    out = io.BytesIO()
    m.save(file=out)
    return out.getvalue()


def _sines(notes, gap=0.15):
    """Sine tones at ``notes`` = [(koma, seconds)], each followed by ``gap`` s of silence."""
    parts = []
    for k, sec in notes:
        t = np.arange(int(sec * SR)) / SR
        ramp = np.minimum(1, np.minimum(t, t[::-1]) / 0.01)
        parts += [0.5 * np.sin(2 * np.pi * _hz(k) * t) * ramp, np.zeros(int(gap * SR))]
    return np.concatenate(parts).astype(np.float32)


def test_score_pitches_are_symbtrs_koma53():
    # The MIDI's notes with their pitch bends, against the Koma53 column of the same piece's SymbTr
    # text score (tests/data, both from SymbTr commit 246bbe362ef1): every note, in order.
    notes = score_notes((DATA / f"{PIECE}.mid").read_bytes(), max_seconds=1e9)
    rows = [line.split("\t") for line in (DATA / f"{PIECE}.txt").read_text().splitlines()[1:]]
    koma = [int(r[4]) for r in rows if r[1] == "9" and r[4] not in ("", "-1")]
    pitched = notes[notes[:, 0] >= 0, 0].astype(int).tolist()
    assert pitched == koma and len(koma) == 104
    assert any(k * 12 % KOMA for k in koma)  # microtones: not all on the 12-tone grid


def test_score_tempo_and_cut():
    midi = (DATA / f"{PIECE}.mid").read_bytes()
    one, fast = score_notes(midi, 1.0, max_seconds=1e9), score_notes(midi, 1.25, max_seconds=1e9)
    np.testing.assert_allclose(one[one[:, 0] >= 0, 1], 1.25 * fast[fast[:, 0] >= 0, 1], rtol=1e-9)
    cut = score_notes(midi, 1.0, max_seconds=20.0)
    assert cut[:, 1].sum() <= 20.0 + 1e-9 and len(cut) < len(one)
    np.testing.assert_array_equal(cut[:-1], one[: len(cut) - 1])
    with pytest.raises(DataError, match="MIDI"):
        score_notes(b"not midi")


def test_synthetic_score_roundtrip_with_rests():
    notes = [(305, 1), (309, 0.5), (327, 0.5), (283, 1)]
    midi = _midi(notes, bpm=120)
    got = score_notes(midi)
    assert got[:, 0].tolist() == [305, 309, 327, 283]
    np.testing.assert_allclose(got[:, 1], [0.5, 0.25, 0.25, 0.5], atol=1e-3)


def test_audio_notes_recover_microtonal_melody():
    melody = [(305, 0.4), (309, 0.3), (327, 0.5), (283, 0.3), (296, 0.6)]
    got = audio_notes(_sines(melody), SR)
    pitched = got[got[:, 0] >= 0]
    assert pitched[:, 0].astype(int).tolist() == [k for k, _ in melody]
    # measured durations: at most one analysis frame longer (its reach into the silence), at most
    # two hops shorter (frames that straddle the onset or the release)
    excess = pitched[:, 1] - [s for _, s in melody]
    assert np.all(excess <= YIN_FRAME / SR) and np.all(excess >= -2 * YIN_HOP / SR), excess
    assert (got[:, 0] < 0).sum() >= len(melody) - 1  # the gaps are rests
    with pytest.raises(DataError, match="no pitched"):
        audio_notes(np.zeros(SR, np.float32), SR)


def test_melody_features_ignore_key_and_tempo():
    rng = np.random.default_rng(0)
    notes = np.column_stack([rng.integers(280, 330, 60), rng.uniform(0.1, 0.8, 60)]).astype(float)
    notes[::7, 0] = -1
    f = melody_features(notes)
    up = notes.copy()
    up[up[:, 0] >= 0, 0] += 9
    slow = notes * [1, 1.5]
    np.testing.assert_allclose(melody_features(up), f)
    np.testing.assert_allclose(melody_features(slow)[:-1], f[:-1])  # all but notes per second
    assert melody_features(slow)[-1] == pytest.approx(f[-1] / 1.5)
    assert f.shape == (95,) and f[:KOMA].sum() == pytest.approx(1)


def test_cv_accuracy_separates_and_refuses_too_few():
    rng = np.random.default_rng(1)
    y = np.repeat(["a", "b", "c"], 10)
    X = rng.normal(size=(30, 5))
    sep = X + 4 * (y[:, None] == np.array(["a", "b", "c", "a", "b"])[None, :])
    assert min(cv_accuracy(sep, y, repeats=2, trees=100)) >= 0.9
    assert np.mean(cv_accuracy(X, y, repeats=3, trees=100)) < 0.6  # features that say nothing
    with pytest.raises(DataError, match="at least 5 pieces"):
        cv_accuracy(X[:12], y[:12])


def test_excerpts_and_piece_grouped_folds():
    notes = np.column_stack([np.arange(300, 310), np.ones(10)]).astype(float)
    notes[4, 0] = -1
    parts = excerpts(notes, 3.0)  # [0, 3), [3, 6), [6, 9); [9, 10) is under half an excerpt
    assert [p[:, 0].tolist() for p in parts] == [[300, 301, 302], [303, -1, 305], [306, 307, 308]]
    # 20 pieces of 5 identical rows, labels drawn per piece: rows of a piece that leak into the
    # training folds give the answer away; folds grouped by piece leave only chance
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(20), 5)
    y = np.repeat(rng.permutation(np.repeat(["a", "b"], 10)), 5)
    X = np.repeat(rng.normal(size=(20, 4)), 5, axis=0)
    assert min(cv_accuracy(X, y, folds=5, repeats=2, trees=50)) == 1.0
    assert np.mean(cv_accuracy(X, y, groups=groups, folds=5, repeats=3, trees=50)) < 0.75
    with pytest.raises(DataError, match="at least 5 pieces"):  # pieces are counted, not rows
        cv_accuracy(X[:40], y[:40], groups=groups[:40], folds=5)


def _mini_corpus(root, n_pieces=6):
    """Two 'composers' with 6 pieces each: 'steps' moves by small intervals in short notes, 'leaps'
    by large ones in long notes; a MIDI score and a sine rendering of each, and a manifest."""
    rng = np.random.default_rng(2)
    midi, rows = root / "midi", []
    midi.mkdir()
    for comp, (step, beats) in {"steps": ((2, 5), 0.5), "leaps": ((18, 40), 1.0)}.items():
        (root / comp).mkdir()
        for i in range(n_pieces):
            k, notes = 300, []
            for _ in range(24):
                k = int(np.clip(k + rng.choice([-1, 1]) * rng.integers(*step), 250, 380))
                notes.append((k, beats * rng.choice([1, 1, 2])))
            name = f"makam--form{i % 2}--usul--p{i}--{comp}"
            (midi / f"{name}.mid").write_bytes(_midi(notes, bpm=240))
            sf.write(root / comp / f"{name}.wav", _sines([(k, b / 4) for k, b in notes], gap=0.05), SR)
            rows.append(dict(path=f"{comp}/{name}.wav", composer=comp, piece=name, makam="makam", form=f"form{i % 2}",
                             usul="usul", gm_program=24, tempo_factor=1.0, seconds=10.0, source_file=f"{name}.mid"))
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return midi


def test_ceiling_cli(tmp_path):
    midi = _mini_corpus(tmp_path)
    r = run_cli("ceiling", tmp_path, "--midi", midi, "--audio", "--folds", 3, "--repeats", 1, "--jobs", 1,
                "--trees", 50, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n_pieces"] == 12 and res["composers"] == ["leaps", "steps"]
    got = {k: v["mean"] for k, v in res["results"].items()}
    assert got["score melody"] == 1.0 and got["audio melody (yin)"] == 1.0
    assert got["form + usul + makam (labels)"] <= 0.75  # the forms alternate within each composer
    r = run_cli("ceiling", tmp_path, "--midi", midi, "--folds", 3, "--repeats", 1, "--trees", 50)
    assert r.returncode == 0 and "score melody + length" in r.stdout and "chance 50.0 %" in r.stdout
    r = run_cli("ceiling", tmp_path, "--midi", midi, "--folds", 3, "--repeats", 1, "--trees", 50, "--excerpt", 2, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["excerpt"] == 2 and res["n_rows"] > 2 * res["n_pieces"]
    assert "score melody + length" not in res["results"] and res["results"]["score melody"]["mean"] >= 0.9


def test_ceiling_cli_bad_input(tmp_path):
    midi = _mini_corpus(tmp_path, n_pieces=3)
    r = run_cli("ceiling", tmp_path, "--midi", tmp_path / "nope")
    assert r.returncode != 0 and "not a folder of MIDI scores" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ceiling", tmp_path, "--midi", midi)  # 3 pieces per composer, 5 folds
    assert r.returncode != 0 and "at least 5 pieces" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ceiling", tmp_path, "--midi", midi, "--folds", 3, "--excerpt", 1000)
    assert r.returncode != 0 and "no piece has a 1000-s part" in r.stderr and "Traceback" not in r.stderr
    next(midi.iterdir()).unlink()
    r = run_cli("ceiling", tmp_path, "--midi", midi, "--folds", 3)
    assert r.returncode != 0 and "scores of the manifest are missing" in r.stderr
    r = run_cli("ceiling", tmp_path, "--midi", midi, "--folds", 1)
    assert r.returncode != 0 and "folds: value 1 is out of range [2, inf]" in r.stderr
    r = run_cli("ceiling", tmp_path, "--midi", midi, "--excerpt", -1)
    assert r.returncode != 0 and "excerpt: value -1.0 is out of range [0.0, inf]" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ceiling", tmp_path, "--midi", midi, "--trees", 0)
    assert r.returncode != 0 and "trees: value 0 is out of range [1, inf]" in r.stderr
