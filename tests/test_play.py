"""`tarab play` under the JACK dummy server: MIDI through a JACK MIDI port, audio captured from JACK.

The probe sends MIDI from its own process callback, so every event has a sample position on the
same clock as the captured audio.
"""

import numpy as np
import pytest
import torch
from conftest import run_cli

from realtime import AudioEngine
from realtime.classify import load_classifier
from realtime.generate import load_generator
from realtime.midi import MidiInput
from realtime.play import build_player
from realtime.presets import load_preset

SR = 22050


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def _session(gen_dir, events, seconds, preset="default"):
    from realtime.jacktools import JackProbe

    probe = JackProbe("tarab-midi-probe", midi=True)
    inst, chain = build_player(load_preset(preset), load_generator(gen_dir), sr=SR, block_size=256)
    midi = MidiInput(inst.handle, virtual=True, name="tarab-test-in", api="jack", on_idle=inst.apply)
    inst.start()
    engine = AudioEngine(chain, sr=SR, block_size=256).start()
    midi.start()
    try:
        probe.connect_through()
        probe.connect_midi("tarab-test-in.*")
        cap = probe.play_and_record(np.zeros(1, np.float32), int(seconds * SR), midi=events)
        import time

        time.sleep(0.3)  # let the MIDI thread drain its queue
        stats = engine.stats()
        alive = midi._thread.is_alive()
    finally:
        engine.stop()
        midi.close()
        inst.stop()
        sent, dropped = probe.midi_sent, probe.midi_dropped
        probe.close()
    return cap, stats, inst, midi, (sent, dropped, alive)


def _onset(cap, start, thr=1e-4):
    nz = np.flatnonzero(np.abs(cap[start:]) > thr)
    return start + int(nz[0]) if len(nz) else None


def test_notes_velocity_and_release_through_jack(jack_server, tiny_models):
    _, _, gen = tiny_models
    t = [int(x * SR) for x in (0.3, 1.8, 3.3, 4.8)]
    events = [(t[0], [0x90, 60, 120]), (t[1], [0x80, 60, 0]),  # alpha (60 % 3 == 0), loud
              (t[2], [0x90, 63, 30]), (t[3], [0x90, 63, 0])]  # alpha again, soft; note-on vel 0 = off
    cap, stats, inst, midi, (sent, dropped, alive) = _session(gen, events, 6.3)
    assert stats.xruns == 0 and stats.faults == 0 and alive
    assert sent == 4 and dropped == 0 and midi.received == 4 and midi.malformed == 0
    assert not cap[: t[0]].any()  # silence before the first note
    on1, on2 = _onset(cap, t[0]), _onset(cap, t[2])
    assert on1 is not None and on2 is not None
    lat1, lat2 = (on1 - t[0]) / SR, (on2 - t[2]) / SR
    assert 0.01 < lat1 < 0.15 and 0.01 < lat2 < 0.15, (lat1, lat2)  # bench: distribution over 100 notes
    loud = _rms(cap[on1 + SR // 5: t[1]])
    soft = _rms(cap[on2 + SR // 5: t[3]])
    mm = inst.map
    expect = mm.level_for(120) / mm.level_for(30)  # (120/30)^1.5 = 8 (18 dB)
    assert expect / 2.5 < loud / soft < expect * 2.5, (loud / soft, expect)
    # after note-off: fades (release 0.8 s), then silence
    out_lat = on1 - t[0]
    steps = [_rms(cap[t[1] + out_lat + k * SR // 10: t[1] + out_lat + (k + 1) * SR // 10]) for k in range(8)]
    assert steps[0] > steps[3] > steps[6] and steps[0] > 4 * steps[6], steps
    tail = cap[t[1] + out_lat + int(0.9 * SR): t[2]]  # the voice is silent; only the reverb tail remains
    assert _rms(tail) < 0.02 * steps[0] and _rms(tail[-SR // 4:]) < 0.002 * steps[0]
    assert np.abs(cap).max() < 1.0  # never clips


def test_cc_sweep_moves_the_style(jack_server, tiny_models):
    """Mod wheel 0 → 127 morphs alpha toward beta: the classifier's P(beta) rises."""
    _, cls_dir, gen = tiny_models
    events = [(int(0.1 * SR), [0xB0, 1, 0]), (int(0.2 * SR), [0x90, 60, 100])]
    events += [(int((3.5 + k * 0.01) * SR), [0xB0, 1, min(127, k * 16)]) for k in range(9)]  # a quick sweep
    cap, stats, inst, midi, _ = _session(gen, events, 8.0)
    assert stats.xruns == 0 and inst.mix == 1.0 and inst.last_cc[1] == 127
    judge = load_classifier(cls_dir)
    from realtime.mel import StreamingMel

    sm = StreamingMel()
    W = judge.card.window_frames
    beta = judge.card.labels.index("beta")

    def p_beta(seg):
        S = sm.transform(seg)
        sm.reset()
        wins = np.stack([S[:, a:a + W] for a in range(0, S.shape[1] - W + 1, 4)])
        with torch.inference_mode():
            return float(judge.module(torch.from_numpy(wins)).numpy()[:, beta].mean())

    before, after = p_beta(cap[int(1.0 * SR): int(3.5 * SR)]), p_beta(cap[int(5.5 * SR): int(8.0 * SR)])
    assert after > before + 0.05, (before, after)


def test_midi_flood_malformed_and_last_value_wins(jack_server, tiny_models):
    """10 000 messages per second for 5 s, with malformed and sysex ones: no xrun, no crash."""
    _, _, gen = tiny_models
    rng = np.random.default_rng(0)
    n = 50_000
    times = np.sort(rng.integers(int(0.2 * SR), int(5.2 * SR), n))
    events = []
    for i, tt in enumerate(times):
        k = i % 20
        if k < 12:
            msg = [0xB0, int(rng.choice([1, 74])), int(rng.integers(0, 128))]
        elif k < 14:
            note = int(rng.integers(36, 96))
            msg = [0x90, note, int(rng.integers(1, 128))] if rng.random() < 0.5 else [0x80, note, 0]
        elif k == 14:
            v = int(rng.integers(0, 16384))
            msg = [0xE0, v & 0x7F, v >> 7]
        elif k == 15:
            msg = [0xF0, 0x7D, 1, 2, 3, 0xF7]  # sysex: ignored
        elif k == 16:
            msg = [0xF4]  # undefined system common
        elif k == 17:
            msg = [0x40, 0x22]  # data bytes without a status
        elif k == 18:
            msg = [0xB0, 1]  # truncated control change
        else:
            msg = [0xC0, int(rng.integers(0, 128))]
        events.append((int(tt), msg))
    events += [(int(5.5 * SR), [0xB0, 1, 77]), (int(5.5 * SR), [0xB0, 74, 33]), (int(5.6 * SR), [0xB0, 64, 0]),
               (int(5.6 * SR), [0xE0, 0, 64])]
    cap, stats, inst, midi, (sent, dropped, alive) = _session(gen, events, 6.5)
    assert alive and midi.errors == 0, midi.last_error
    assert stats.xruns == 0 and stats.faults == 0
    assert sent + dropped == len(events)
    n_sysex = sum(1 for _, m in events if m[0] == 0xF0)
    assert dropped == 0 and midi.received == sent - n_sysex  # every message arrived (sysex is ignored by rtmidi)
    assert midi.malformed > 0
    m = inst.map
    assert inst.last_cc[1] == 77 and inst.mix == pytest.approx(77 / 127)
    assert inst.temperature == pytest.approx(m.temperature_min + (m.temperature_max - m.temperature_min) * 33 / 127)
    assert inst.transpose == 0.0 and not inst.sustain
    assert np.isfinite(cap).all() and np.abs(cap).max() < 1.0
    print(f"flood: sent {sent}, dropped by JACK {dropped}, received {midi.received}, malformed {midi.malformed}")


def test_play_cli_bad_input(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[midi]\nkeys = "diagonal"\n')
    r = run_cli("play", "--preset", bad, "--seconds", "1")
    assert r.returncode == 2 and "keys" in r.stderr and "cyclic" in r.stderr and r.stderr.count("\n") == 1
    bad.write_text('[midi]\nvoices = 0\n')
    r = run_cli("play", "--preset", bad, "--seconds", "1")
    assert r.returncode == 2 and "voices" in r.stderr
    bad.write_text('[midi]\ncomposers = ["nobody"]\n')
    r = run_cli("play", "--preset", bad, "--seconds", "1")
    assert r.returncode == 2 and "nobody" in r.stderr and "Traceback" not in r.stderr
