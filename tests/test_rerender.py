"""Re-rendering pieces with other instruments (models.rerender) and training on those renders."""

import csv
import dataclasses
import io
import json
import shutil

import mido
import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, _need, run_cli
from models.errors import DataError, ParameterError
from models.rerender import GM_PROGRAMS, MAX_SECONDS, finish, render_midi, rerender_corpus, voice_and_retime
from test_models_train import _train, dataset, mel  # noqa: F401  (module fixtures)

DATA = REPO / "tests" / "data"
MIDI = DATA / "arazbar--seyir--sofyan--1--erol_bingol.mid"
# its row of the corpus manifest: rendered with GM program 42 (cello) at tempo factor 1.0017
CLIP = REPO / "realtime" / "clips" / "erol_bingol.ogg"


def _midi(programs=()):
    m = mido.MidiFile(ticks_per_beat=480)
    tr = mido.MidiTrack()
    m.tracks.append(tr)
    tr.append(mido.MetaMessage("set_tempo", tempo=500000, time=0))
    for p in programs:
        tr.append(mido.Message("program_change", channel=0, program=p, time=0))
    for k in range(4):
        tr.append(mido.Message("note_on", channel=0, note=60 + k, velocity=90, time=0))
        tr.append(mido.Message("note_off", channel=0, note=60 + k, velocity=0, time=480))
    buf = io.BytesIO()
    m.save(file=buf)
    return buf.getvalue()


def test_voice_and_retime_sets_the_program_and_scales_the_tempo():
    src = _midi()
    out = mido.MidiFile(file=io.BytesIO(voice_and_retime(src, 40, 1.25)))
    msgs = [m for tr in out.tracks for m in tr]
    assert msgs[0].type == "program_change" and msgs[0].program == 40 and msgs[0].channel == 0
    assert [m.tempo for m in msgs if m.type == "set_tempo"] == [400000]
    before = mido.MidiFile(file=io.BytesIO(src)).length
    assert before == pytest.approx(2.0) and out.length == pytest.approx(before / 1.25)
    # a program change already in the score is overwritten too
    out = mido.MidiFile(file=io.BytesIO(voice_and_retime(_midi(programs=[0]), 73, 1.0)))
    assert {m.program for tr in out.tracks for m in tr if m.type == "program_change"} == {73}
    with pytest.raises(ParameterError):
        voice_and_retime(src, 128, 1.0)
    with pytest.raises(ParameterError):
        voice_and_retime(src, 40, 0.0)
    with pytest.raises(DataError, match="MIDI"):
        voice_and_retime(b"not a midi file", 40, 1.0)


def test_finish_trims_caps_fades_and_normalises():
    sr = 22050
    rng = np.random.default_rng(0)
    body = rng.standard_normal(sr * 2).astype(np.float32) * 0.3
    y = np.concatenate([np.full(sr, 1e-5, np.float32), body, np.full(sr, 1e-5, np.float32)])
    out = finish(y, sr)
    assert out.size == body.size  # the -50 dB silence on both sides is gone
    assert np.abs(out).max() == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    np.testing.assert_allclose(out / out[np.argmax(np.abs(out))], body / body[np.argmax(np.abs(body))], rtol=1e-5)
    long = rng.standard_normal(int(sr * (MAX_SECONDS + 3))).astype(np.float32)
    out = finish(long, sr)
    assert out.size == int(MAX_SECONDS * sr) and out[-1] == 0.0  # capped, faded out
    with pytest.raises(DataError, match="silent"):
        finish(np.zeros(100, np.float32))


def _logmel(y):
    import librosa

    return librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=22050, n_mels=64), top_db=80)


def _has_soundfont():
    from pathlib import Path

    from models.rerender import SOUNDFONTS

    return any(Path(p).is_file() for p in SOUNDFONTS)


def test_a_rerender_with_the_pieces_own_program_reproduces_the_corpus_clip():
    """The corpus recipe, followed: the shipped clip (the middle 10 s of the corpus file) is closest to our
    render of the same score with the piece's own program and tempo factor."""
    if shutil.which("fluidsynth") is None or not _has_soundfont():
        _need("fluidsynth and fluid-soundfont-gm are not installed (make test installs them)")
    from models.rerender import find_soundfont

    clip, _ = sf.read(CLIP, dtype="float32")
    ref = _logmel(clip)[:, 20:-20]

    def distance(program):  # mean |dB| to the clip, at the best offset around the middle
        y = finish(render_midi(voice_and_retime(MIDI.read_bytes(), program, 1.0017), soundfont=find_soundfont()))
        a = (y.size - clip.size) // 2  # make_clips.py cuts the middle
        return y.size, min(np.abs(_logmel(y[a + s: a + s + clip.size])[:, 20:-20] - ref).mean()
                           for s in range(-2048, 2049, 256))

    d = {p: distance(p) for p in GM_PROGRAMS}
    assert abs(d[42][0] / 22050 - 64.487) < 0.2  # the manifest's duration, with its tempo factor
    own = d[42][1]  # the manifest's program for this piece (cello)
    assert own < 4.0, own  # measured 3.3 dB (plucked instruments reproduce closer, 1.1-2.0 dB over whole pieces)
    others = sorted(v[1] for p, v in d.items() if p != 42)
    assert own < others[0], d  # of the corpus's 8 instruments, the piece's own is the one the clip matches


def test_rerender_corpus_bad_input(tmp_path):
    with pytest.raises(DataError, match="manifest.csv"):
        rerender_corpus(tmp_path, tmp_path, tmp_path / "out")
    (tmp_path / "manifest.csv").write_text("path,composer\nx/a.ogg,x\n")
    with pytest.raises(DataError, match="columns"):
        rerender_corpus(tmp_path, tmp_path, tmp_path / "out")
    (tmp_path / "split.json").write_text("not json")
    r = run_cli("rerender", str(tmp_path), "--midi", str(tmp_path), "-o", str(tmp_path / "out"),
                "--split", str(tmp_path / "split.json"))
    assert r.returncode != 0 and "not a split file" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("rerender", str(tmp_path), "--midi", str(tmp_path), "-o", str(tmp_path / "out"), "--programs", "40,x")
    assert r.returncode != 0 and "--programs" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_rerender_writes_a_data_set_with_the_corpus_piece_ids(tmp_path):
    if shutil.which("fluidsynth") is None or not _has_soundfont():
        _need("fluidsynth and fluid-soundfont-gm are not installed (make test installs them)")
    corpus, midi = tmp_path / "corpus", tmp_path / "midi"
    corpus.mkdir()
    midi.mkdir()
    shutil.copy(MIDI, midi / MIDI.name)
    piece = MIDI.stem
    (corpus / "manifest.csv").write_text(
        "path,composer,piece,gm_program,tempo_factor,source_file\n"
        f"erol_bingol/arazbar--seyir--sofyan--1.ogg,erol_bingol,{piece},42,1.0017,{MIDI.name}\n"
        f"erol_bingol/missing.ogg,erol_bingol,missing--erol_bingol,42,1.0,missing.mid\n")
    out = tmp_path / "out"
    args = ["rerender", str(corpus), "--midi", str(midi), "-o", str(out), "--programs", "42,73", "--json"]
    r = run_cli(*args)
    assert r.returncode == 1 and "missing.mid" in r.stdout  # the missing score is reported, the rest rendered
    res = json.loads(r.stdout)
    assert res["rendered"] == 1 and res["kept"] == 0  # program 73 of the real score; 42 is its own, skipped
    assert [f for f, _ in res["failed"]] == ["erol_bingol/missing.gm73.ogg"]
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [(r_["path"], r_["piece"], r_["gm_program"]) for r_ in rows] == [
        ("erol_bingol/arazbar--seyir--sofyan--1.gm73.ogg", piece, "73")]
    y, sr = sf.read(out / rows[0]["path"], dtype="float32")
    assert sr == 22050 and y.ndim == 1 and np.abs(y).max() == pytest.approx(10 ** (-1 / 20), abs=0.02)
    assert not list(out.rglob(".*.tmp"))
    r = run_cli(*args)  # a second run keeps what is there
    assert json.loads(r.stdout)["kept"] == 1
    r = run_cli(*args[:-1])  # the text summary
    assert r.returncode == 1 and "1 already there" in r.stdout and "in 1 files" in r.stdout
    assert "failed: erol_bingol/missing.gm73.ogg" in r.stderr and "Traceback" not in r.stderr


def _extra_renders(data_dir, root):
    """A second rendering of every piece of ``data_dir`` (here: the same audio, 6 dB quieter), with a
    manifest that gives each file its corpus piece id."""
    rows = []
    for f in sorted(data_dir.glob("*/*.wav")):
        y, sr = sf.read(f, dtype="float32")
        rel = f"{f.parent.name}/{f.stem}.gm40.wav"
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, y * 0.5, sr)
        rows.append({"path": rel, "piece": f.stem})
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "piece"])
        w.writeheader()
        w.writerows(rows)
    return rows


def test_extra_renders_only_add_training_pieces(tmp_path, dataset, mel):  # noqa: F811
    base = _train(dataset, tmp_path / "a", mel, tmp_path / "cache", cfg=dict(epochs=1))
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    extra = tmp_path / "extra"
    rows = _extra_renders(dataset, extra)
    res = _train(dataset, tmp_path / "b", mel, tmp_path / "cache", cfg=dict(epochs=1, extra_train=str(extra)))
    assert res["extra_train_files"] == len(split["train"]) == sum(r["piece"] in split["train"] for r in rows)
    assert res["train_windows"] == 2 * base["train_windows"]  # every training piece twice, nothing else
    assert res["test"]["n_windows"] == base["test"]["n_windows"]  # validation and test untouched
    assert json.loads((tmp_path / "b" / "split.json").read_text()) == split
    from models.bundle import load_bundle

    card = load_bundle(tmp_path / "b").card
    assert "other renderings of the training pieces" in card.training_data
    assert card.extra["config"]["extra_train"] == "extra"  # the folder, not this machine's path

    from models.generator import GenConfig, train_generator

    tiny = GenConfig(frames=16, hop_frames=4, latent=8, cond=4, channels=32, epochs=1, batch_size=8, val_frac=0.25,
                     test_frac=0.25)
    kw = dict(featurizer=mel.transform, mel_config=mel.config, cache_dir=tmp_path / "cache", progress=False)
    g0 = train_generator(dataset, tmp_path / "g0", config=tiny, **kw)
    g1 = train_generator(dataset, tmp_path / "g1", config=dataclasses.replace(tiny, extra_train=str(extra)), **kw)
    assert g1["extra_train_files"] == len(split["train"]) and g1["train_windows"] == 2 * g0["train_windows"]
    card = load_bundle(tmp_path / "g1").card
    assert "other renderings" in card.training_data and card.extra["config"]["extra_train"] == "extra"

    with open(extra / "manifest.csv", "a", newline="") as fh:  # a piece the corpus does not have
        fh.write("alpha/alpha_0.gm40.wav,no_such_piece\n")
    with pytest.raises(DataError, match="not in the training data"):
        _train(dataset, tmp_path / "c", mel, tmp_path / "cache", cfg=dict(epochs=1, extra_train=str(extra)))
    shutil.rmtree(extra)
    (extra / "zeta").mkdir(parents=True)
    sf.write(extra / "zeta" / "z.wav", np.zeros(22050, np.float32), 22050)
    (extra / "alpha").mkdir()
    sf.write(extra / "alpha" / "alpha_0.wav", np.zeros(22050, np.float32), 22050)
    with pytest.raises(DataError, match="zeta"):
        _train(dataset, tmp_path / "d", mel, tmp_path / "cache", cfg=dict(epochs=1, extra_train=str(extra)))
    with pytest.raises(DataError, match="itself"):
        _train(dataset, tmp_path / "e", mel, tmp_path / "cache", cfg=dict(epochs=1, extra_train=str(dataset)))
    with pytest.raises(ParameterError, match="leaky"):
        _train(dataset, tmp_path / "f", mel, tmp_path / "cache",
               cfg=dict(epochs=1, extra_train=str(extra), leaky_window_split=True))
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.train").exists()  # refused before anything is written


def test_render_midi_reports_fluidsynth_failures():
    if shutil.which("fluidsynth") is None or not _has_soundfont():
        _need("fluidsynth and fluid-soundfont-gm are not installed (make test installs them)")
    from models.rerender import find_soundfont

    with pytest.raises(DataError, match="fluidsynth failed: .+"):
        render_midi(b"not a midi file", soundfont=find_soundfont())
    with pytest.raises(DataError, match="no soundfont"):
        find_soundfont("/nonexistent.sf2")


def test_other_piece_rows_leave_out_the_corpus_and_versions_of_its_pieces(tmp_path):
    from models.rerender import other_piece_rows

    corpus = [{"composer": "sevki_bey", "source_file": "hicaz--sarki--aksak--bilmiyorum--sevki_bey.mid"},
              {"composer": "erol_bingol", "source_file": "acem--seyir--sofyan--1--erol_bingol.mid"}]
    names = ["hicaz--sarki--aksak--bilmiyorum--sevki_bey",  # the corpus's own score
             "hicaz--sarki--curcuna--bilmiyorum--sevki_bey",  # the same song in another usul: a version
             "acem--seyir--duyek--2--erol_bingol",  # numbered seyir, same makam and form: a version
             "rast--seyir--sofyan--1--erol_bingol",  # another makam: a new piece
             "ussak--sarki--aksak--daglar--sevki_bey", "yegah--sarki--aksak--du--sevki_bey",
             "zavil--sarki--aksak--third--sevki_bey",  # over the cap of 2
             "hicaz--sarki--aksak--bilmiyorum--dede_efendi",  # a composer the corpus lacks
             "nihavent--pesrev--devrikebir----sevki_bey"]  # untitled: keyed by makam and form, new
    for n in names:
        (tmp_path / f"{n}.mid").write_bytes(b"MThd")
    rows = other_piece_rows(corpus, tmp_path, per_composer=2)
    assert [r["piece"] for r in rows] == ["nihavent--pesrev--devrikebir----sevki_bey",
                                          "rast--seyir--sofyan--1--erol_bingol",
                                          "ussak--sarki--aksak--daglar--sevki_bey"]
    assert rows[1]["path"] == "erol_bingol/rast--seyir--sofyan--1.ogg" and rows[1]["gm_program"] == "-1"
    tf = [float(r["tempo_factor"]) for r in rows]
    assert all(0.85 <= t <= 1.15 for t in tf) and len(set(tf)) == 3
    assert other_piece_rows(corpus, tmp_path, per_composer=2) == rows  # deterministic
    with pytest.raises(ParameterError, match="other_pieces"):
        rerender_corpus(tmp_path, tmp_path, tmp_path / "out", other_pieces=-1)


def test_other_pieces_are_all_added_and_must_not_be_corpus_pieces(tmp_path, dataset, mel):  # noqa: F811
    base = _train(dataset, tmp_path / "a", mel, tmp_path / "cache", cfg=dict(epochs=1))
    other = tmp_path / "other"
    rows = []
    for f in sorted(dataset.glob("*/*.wav"))[::2]:  # every other piece, as if it were a new one
        y, sr = sf.read(f, dtype="float32")
        rel = f"{f.parent.name}/new_{f.stem}.wav"
        (other / f.parent.name).mkdir(parents=True, exist_ok=True)
        sf.write(other / rel, y[::-1].copy(), sr)
        rows.append({"path": rel, "piece": f"new_{f.stem}"})
    with open(other / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "piece"])
        w.writeheader()
        w.writerows(rows)
    res = _train(dataset, tmp_path / "b", mel, tmp_path / "cache", cfg=dict(epochs=1, other_train=str(other)))
    assert res["other_train_files"] == len(rows) and res["extra_train_files"] == 0
    per_file = base["train_windows"] / len(json.loads((tmp_path / "a" / "split.json").read_text())["train"])
    assert res["train_windows"] == base["train_windows"] + len(rows) * per_file  # all of them, same length
    assert res["test"]["n_windows"] == base["test"]["n_windows"]
    from models.bundle import load_bundle

    assert "pieces outside the corpus" in load_bundle(tmp_path / "b").card.training_data
    from models.generator import GenConfig, train_generator

    g = train_generator(dataset, tmp_path / "g", config=GenConfig(frames=16, hop_frames=4, latent=8, cond=4, channels=32,
                                                                  epochs=1, batch_size=8, val_frac=0.25, test_frac=0.25,
                                                                  other_train=str(other)),
                        featurizer=mel.transform, mel_config=mel.config, cache_dir=tmp_path / "cache", progress=False)
    assert g["other_train_files"] == len(rows) and "pieces outside the corpus" in load_bundle(tmp_path / "g").card.training_data
    with open(other / "manifest.csv", "a", newline="") as fh:  # a corpus piece slipped in
        fh.write("alpha/new_alpha_0.wav,alpha_0\n")
    with pytest.raises(DataError, match="of the training data itself"):
        _train(dataset, tmp_path / "c", mel, tmp_path / "cache", cfg=dict(epochs=1, other_train=str(other)))
