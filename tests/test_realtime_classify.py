"""Classification: offline through the block path, live through the JACK device, and both equal."""

import json
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, repeat_on_graph_xrun, run_cli, tarab_on_time
from realtime import AudioEngine, Chain, Recorder
from realtime.classify import ClassifierUnit, ClassifierWorker, Estimator, load_classifier
from realtime.offline import classify_file

CLIPS = REPO / "realtime" / "clips"


@pytest.fixture(scope="module")
def bundle():
    return load_classifier()


def _offline_on_samples(bundle, y, sr, block=1024, rate=4.0):
    unit = ClassifierUnit(bundle.card)
    unit.prepare(sr, block, 1)
    est = Estimator(bundle, unit, rate, 2.0, -55.0)
    for a in range(0, y.size, block):
        unit.process(y[None, a:a + block])
        est.poll()
    return est


def test_block_pattern_does_not_change_estimates(bundle):
    y, sr = sf.read(CLIPS / "sevki_bey.ogg", dtype="float32")
    a = _offline_on_samples(bundle, y, sr, block=4096)
    b = _offline_on_samples(bundle, y, sr, block=37)
    assert len(a.estimates) == len(b.estimates) > 0
    for ea, eb in zip(a.estimates, b.estimates):
        assert ea.frame_end == eb.frame_end
        np.testing.assert_allclose(ea.probs, eb.probs, atol=1e-6)


@pytest.mark.parametrize("rate_hz, seconds", [(4.0, 20.0), (0.5, 75.0)])
def test_batched_polls_give_the_same_estimates(bundle, rate_hz, seconds):
    """`poll(batch=32)` (as files use) and `poll()` after every block (live) publish the same windows with
    the same probabilities, smoothing and levels. At 0.5 Hz 32 windows span more than the ring
    holds: the batch shrinks to what it holds instead of losing windows."""
    from realtime.classify import OFFLINE_BATCH, ClassifierUnit, Estimator

    y, sr = sf.read(CLIPS / "sevki_bey.ogg", dtype="float32")
    y = np.tile(y, int(np.ceil(seconds * sr / y.size)))[: int(seconds * sr)]
    runs = []
    for batch in (1, OFFLINE_BATCH):
        unit = ClassifierUnit(bundle.card).prepare(sr, 512, 1)
        est = Estimator(bundle, unit, rate_hz, 2.0, -55.0)
        for a in range(0, y.size, 512):
            unit.process(y[None, a:a + 512])
            if batch == 1:
                est.poll()
            elif est.batch_ready(batch):
                assert est.due() == min(batch, est.batch_cap)
                est.poll(batch=batch)
        est.poll(batch=batch)
        runs.append(est.estimates)
        assert est.skipped == 0
    a, b = runs
    cap = est.batch_cap
    assert len(a) == len(b) > min(OFFLINE_BATCH, cap)  # at least one full batch and a remainder
    assert (cap < OFFLINE_BATCH) == (rate_hz < 1)
    assert [e.frame_end for e in a] == [e.frame_end for e in b]
    np.testing.assert_allclose([e.probs for e in a], [e.probs for e in b], atol=1e-6)
    np.testing.assert_allclose([e.smoothed for e in a], [e.smoothed for e in b], atol=1e-6)
    assert [e.listening for e in a] == [e.listening for e in b]
    np.testing.assert_allclose([e.level_db for e in a], [e.level_db for e in b], atol=1e-9)


def test_rate_and_smoothing(bundle):
    y, sr = sf.read(CLIPS / "erol_bingol.ogg", dtype="float32")
    est = _offline_on_samples(bundle, y, sr, rate=4.0)
    assert est.hop_frames == 11 and est.rate_hz == pytest.approx(22050 / 512 / 11)
    times = np.array([e.time_s for e in est.estimates])
    assert np.allclose(np.diff(times), 11 * 512 / 22050)
    W = bundle.card.window_frames
    expected = 1 + (sr * 10 // 512 - 3 - W) // 11  # frames in 10 s, first window at W
    assert abs(len(est.estimates) - expected) <= 1
    # EMA: smoothed = (1-a) * previous + a * raw
    e0, e1 = est.estimates[0], est.estimates[1]
    np.testing.assert_allclose(e1.smoothed, (1 - est.alpha) * e0.smoothed + est.alpha * e1.probs, atol=1e-9)
    assert abs(sum(e1.smoothed) - 1) < 1e-5


def test_silence_is_listening(bundle):
    est = _offline_on_samples(bundle, np.zeros(22050 * 7, np.float32), 22050)
    assert est.estimates and all(e.listening for e in est.estimates)
    assert all(e.as_dict(est.labels)["leader"] is None for e in est.estimates)


def test_classify_formats_rates_channels(bundle, tmp_path):
    y, sr = sf.read(CLIPS / "haci_arif_bey.ogg", dtype="float32")
    ref = classify_file(CLIPS / "haci_arif_bey.ogg", bundle, rate_hz=4, time_constant_s=2, silence_db=-55)
    import soxr

    variants = {
        "stereo.wav": (np.stack([y, y], 1), sr, "WAV"),
        "eight.flac": (np.tile(y[:, None], (1, 8)), sr, "FLAC"),
        "r44.aiff": (soxr.resample(y, sr, 44100), 44100, "AIFF"),
        "r8k.wav": (soxr.resample(y, sr, 8000), 8000, "WAV"),
        "r192k.wav": (soxr.resample(y, sr, 192000), 192000, "WAV"),
        "mono.mp3": (y, sr, "MP3"),
    }
    for name, (data, rate, fmt) in variants.items():
        sf.write(tmp_path / name, data, rate, format=fmt, subtype="FLOAT" if name == "stereo.wav" else None)
        r = classify_file(tmp_path / name, bundle, rate_hz=4, time_constant_s=2, silence_db=-55)
        assert abs(r.windows - ref.windows) <= 1, name
        if name == "stereo.wav":  # float samples, identical after the mono mix
            np.testing.assert_allclose(r.probabilities, ref.probabilities, atol=1e-5)
        elif name == "eight.flac":  # 16-bit quantisation only
            np.testing.assert_allclose(r.probabilities, ref.probabilities, atol=2e-3)
        elif name != "r8k.wav":  # 8 kHz loses everything above 4 kHz
            assert np.abs(r.probabilities - ref.probabilities).max() < 0.15, (name, r.probabilities, ref.probabilities)


def test_short_file_gets_one_padded_window(bundle, tmp_path):
    y, sr = sf.read(CLIPS / "dede_efendi.ogg", dtype="float32")
    sf.write(tmp_path / "short.wav", y[: sr * 2], sr)
    r = classify_file(tmp_path / "short.wav", bundle, rate_hz=4, time_constant_s=2, silence_db=-55)
    assert r.windows == 1 and abs(r.probabilities.sum() - 1) < 1e-5


def test_cli_classify_bad_files_and_json(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.ogg").write_text("this is not audio")
    good = CLIPS / "sefik_gurmeric.ogg"
    data = good.read_bytes()
    (tmp_path / "trunc.ogg").write_bytes(data[:200])
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 1000, np.float32), 22050, subtype="FLOAT")
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), 22050)
    bad = ["empty.wav", "text.ogg", "trunc.ogg", "nan.wav", "zero.wav", "missing.wav"]
    r = run_cli("classify", good, *[tmp_path / b for b in bad], "--json", "--timeline", tmp_path / "tl-{stem}.png")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    errs = r.stderr.strip().splitlines()
    assert len(errs) == len(bad) and all(e.startswith("tarab: error:") for e in errs)
    for b in bad:
        assert any(b in e for e in errs), b
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(out) == 1 and out[0]["file"].endswith("sefik_gurmeric.ogg")
    assert set(out[0]["probabilities"]) == set(load_classifier().card.labels) and out[0]["windows"] > 10
    png = tmp_path / "tl-sefik_gurmeric.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["tl-sefik_gurmeric.png"]


def test_cli_bad_model(tmp_path):
    r = run_cli("classify", CLIPS / "demo.ogg", "--model", tmp_path)
    assert r.returncode == 2 and "bundle has no card.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.jack
def test_live_classification_through_jack(jack_probe, bundle):
    """Inject a clip through JACK into the engine running the classifier (worker thread)."""
    clip, sr = sf.read(CLIPS / "demo.ogg", dtype="float32")
    y = np.concatenate([np.zeros(6 * sr, np.float32), clip])  # 6 s of silence first

    def run():
        rec = Recorder(seconds=60)
        unit = ClassifierUnit(bundle.card)
        engine = AudioEngine(Chain([rec, unit]), sr=jack_probe.sr, block_size=256).start()
        est = Estimator(bundle, unit, rate_hz=4.0)
        worker = ClassifierWorker(est)
        try:
            jack_probe.connect_through()
            worker.start()
            t0 = time.time()
            jack_probe.play_and_record(y, y.size + sr // 2)
            time.sleep(0.5)
            t1 = time.time()
        finally:
            stats = engine.stats()
            engine.stop()  # no more input: the recorder now holds exactly what the mel saw
            worker.stop()
        return rec, est, worker, stats, t0, t1

    rec, est, worker, stats, t0, t1 = repeat_on_graph_xrun(run, lambda r: r[3])
    published = len(est.estimates)
    est.poll()  # windows completed between the worker's last poll and the engine's stop
    assert len(est.estimates) - published <= 2
    live = est.estimates
    assert tarab_on_time(stats), stats
    assert stats.faults == 0 and worker.error is None and est.skipped == 0
    # published at the configured rate, in stream time and in wall time
    assert abs(len(live) - (rec.ring.written - 2048) / 512 / 11 + bundle.card.window_frames / 11) <= 2
    gaps = np.diff([e.wall_time for e in live if e.wall_time > t0 + 7])
    assert 0.15 < np.median(gaps) < 0.35
    assert live[-1].wall_time > t1 - 1.0  # still publishing at the end
    # the engine's input, replayed offline, gives the same estimates window for window
    recorded = rec.drain()[0]
    off = _offline_on_samples(bundle, recorded, sr, block=4096)
    assert [e.frame_end for e in off.estimates] == [e.frame_end for e in live]
    for a, b in zip(off.estimates, live):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        np.testing.assert_allclose(a.smoothed, b.smoothed, atol=1e-5)
    # windows before the clip arrived were silent: "listening"
    assert live[0].listening
    # the leader over the windows that lie inside the clip equals the offline classification of
    # the clip file (the two frame grids differ by less than a hop)
    from realtime.jacktools import measure_delay

    c = bundle.card
    a = measure_delay(clip, recorded)
    inside = [e.probs for e in live
              if (e.frame_end - c.window_frames) * c.hop_length >= a
              and (e.frame_end - 1) * c.hop_length + c.n_fft <= a + clip.size]
    assert len(inside) >= 50
    ref = classify_file(CLIPS / "demo.ogg", bundle, rate_hz=4, time_constant_s=2, silence_db=-55)
    assert est.labels[int(np.argmax(np.mean(inside, axis=0)))] == ref.composer


@pytest.mark.jack
def test_live_cli_at_another_device_rate(jack_server):
    """A 48 kHz device: the classifier resamples to the model's 22050 Hz and keeps publishing."""
    import os

    from realtime.jacktools import dummy_server

    name = f"tarab-48k-{os.getpid()}"

    def once():
        with dummy_server(name, sr=48000, period=512):
            r = run_cli("live", "--sr", "48000", "--block", "512", "--seconds", "7", "--json",
                        env={"JACK_DEFAULT_SERVER": name})
        assert r.returncode == 0, r.stderr
        return [json.loads(x) for x in r.stdout.splitlines()]

    lines = repeat_on_graph_xrun(once, lambda lines: lines[-1])  # rerun after a graph xrun (conftest)
    ests = [x for x in lines if "probabilities" in x]
    end = lines[-1]
    assert end["event"] == "end" and end["sr"] == 48000 and tarab_on_time(end) and end["faults"] == 0, end
    assert len(ests) >= 4  # the first window needs 5 s of audio, then ~3.9 per second
    assert all(x["listening"] for x in ests)  # the dummy device delivers silence
    assert abs(ests[-1]["time"] - ests[-2]["time"] - 11 * 512 / 22050) < 1e-3
