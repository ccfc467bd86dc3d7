"""`tarab play` under the JACK dummy server: MIDI through a JACK MIDI port, audio captured from JACK.

The probe sends MIDI from its own process callback, so every event has a sample position on the
same clock as the captured audio.
"""

import numpy as np
import pytest
import torch
from conftest import JACK_PERIOD, repeat_on_graph_xrun, run_cli, steal_too_high, tarab_on_time

from realtime import AudioEngine
from realtime.classify import load_classifier
from realtime.generate import load_generator
from realtime.midi import MidiInput
from realtime.play import build_player
from realtime.presets import load_preset

SR = 22050


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def _session(gen_dir, events, seconds, preset="default", clean=False):
    """One run, repeated after graph xruns as conftest.repeat_on_graph_xrun decides (clean: need none)."""
    return repeat_on_graph_xrun(lambda: _session_once(gen_dir, events, seconds, preset), lambda r: r[1], clean=clean)


def _session_once(gen_dir, events, seconds, preset):
    from realtime.jacktools import JackProbe

    probe = JackProbe("tarab-midi-probe", midi=True)
    inst, chain = build_player(load_preset(preset), load_generator(gen_dir), sr=SR, block_size=256)
    midi = MidiInput(inst.handle, virtual=True, name="tarab-test-in", api="jack", on_idle=inst.apply)
    inst.start()
    engine = AudioEngine(chain, sr=SR, block_size=256).start()
    midi.start()
    import dataclasses
    import time

    try:
        probe.connect_through()
        probe.connect_midi("tarab-test-in.*")
        time.sleep(0.5)  # the graph settles after the connections
        x0 = engine.xruns
        cap = probe.play_and_record(np.zeros(1, np.float32), int(seconds * SR), midi=events)
        time.sleep(0.3)  # let the MIDI thread drain its queue
        # xruns while the music played (not while ports were being connected)
        stats = dataclasses.replace(engine.stats(), xruns=engine.xruns - x0)
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


def _align(cap, near, ref, search=512):
    """Where in ``cap`` the offline render ``ref`` starts: the lag within ``near ± search`` that best
    correlates ``ref``'s first half second with the capture. A threshold onset fires late on a soft
    note (its attack ramp stays under the threshold longer), which shifts level comparisons."""
    seg = ref[: SR // 2].astype(np.float64)
    lo = max(0, near - search)
    xc = np.correlate(cap[lo: near + search + len(seg)].astype(np.float64), seg, "valid")
    return lo + int(np.argmax(xc))


def test_notes_velocity_and_release_through_jack(jack_server, tiny_models, tmp_path):
    _, _, gen = tiny_models
    preset = tmp_path / "dry.toml"  # no FX and a low master level: nothing limits, levels are the voices'
    preset.write_text('description = "test"\n[midi]\nmaster_db = -20.0\nrelease_s = 0.8\nvelocity_curve = 1.5\n')
    t = [int(x * SR) for x in (0.3, 1.8, 3.3, 4.8)]
    events = [(t[0], [0x90, 60, 120]), (t[1], [0x80, 60, 0]),  # alpha (60 % 3 == 0), loud
              (t[2], [0x90, 63, 30]), (t[3], [0x90, 63, 0])]  # alpha again, soft; note-on vel 0 = off
    # levels and envelopes are compared with offline renders aligned at each onset: a dropped period
    # in between would shift them, so this test needs a run without graph xruns
    cap, stats, inst, midi, (sent, dropped, alive) = _session(gen, events, 6.3, preset=preset, clean=True)
    assert tarab_on_time(stats) and stats.faults == 0 and alive, stats
    assert sent == 4 and dropped == 0 and midi.received == 4 and midi.malformed == 0
    assert not cap[: t[0]].any()  # silence before the first note
    seen = [_onset(cap, t[0]), _onset(cap, t[2])]
    assert None not in seen, seen
    # the level each note got: its captured audio over the same phrase rendered offline (same seed
    # and targets give the same samples), so the phrases' own loudness drops out; each note's start is
    # where its offline render correlates best with the capture
    from realtime.generate import StyleSynth

    synth = StyleSynth(load_generator(gen))
    mm = inst.map
    gains, starts, refs = [], [], []
    # note 1's render runs to the second note: the release check below reads it too
    for near, t_off, t_end, seed in zip(seen, (t[1], t[3]), (t[2], t[3] + SR // 10), (60 * 100003 + 1, 63 * 100003 + 2)):
        synth.set_target("alpha", "beta", 0.0, 1.0)
        synth.start(seed)
        ref = synth.render(t_end - near)
        on = _align(cap, near, ref)
        starts.append(on)
        refs.append(ref)
        a, b = SR // 5, t_off - on - SR // 10  # after the attack ramp, before the release
        gains.append(_rms(cap[on + a: on + b]) / _rms(ref[a:b]))
    on1, on2 = starts
    assert on1 <= seen[0] and on2 <= seen[1], (starts, seen)  # a sound is not heard before it starts
    lat1, lat2 = (on1 - t[0]) / SR, (on2 - t[2]) / SR
    assert 0.01 < lat1 < 0.15 and 0.01 < lat2 < 0.15, (lat1, lat2)  # bench: distribution over 100 notes
    master = 10 ** (mm.master_db / 20)
    assert gains[0] == pytest.approx(mm.level_for(120) * master, rel=0.01), gains
    assert gains[1] == pytest.approx(mm.level_for(30) * master, rel=0.01), gains  # (30/127)^1.5: 18 dB softer
    # after note-off: the gain falls linearly to 0 over release_s (0.8 s), then silence
    ref = refs[0]
    off = t[1] + (on1 - t[0])  # note-off plus the same MIDI → output delay as the note-on
    env = []
    for k in range(7):
        a, b = off + k * SR // 10 - on1, off + (k + 1) * SR // 10 - on1
        env.append(_rms(cap[on1 + a: on1 + b]) / _rms(ref[a:b]) / (mm.level_for(120) * master))
    expect = [1 - (k + 0.5) / 8 for k in range(7)]  # mid-segment values of the linear ramp
    assert np.allclose(env, expect, atol=0.12), (env, expect)
    assert not cap[off + int(0.85 * SR): t[2]].any()  # faded out completely (no FX tail here)
    assert np.abs(cap).max() < 1.0  # never clips


def test_cc_sweep_moves_the_style(jack_server, tiny_models):
    """Mod wheel 0 → 127 morphs alpha toward beta: the classifier's P(beta) rises."""
    _, cls_dir, gen = tiny_models
    events = [(int(0.1 * SR), [0xB0, 1, 0]), (int(0.2 * SR), [0x90, 60, 100])]
    events += [(int((3.5 + k * 0.01) * SR), [0xB0, 1, min(127, k * 16)]) for k in range(9)]  # a quick sweep
    cap, stats, inst, midi, _ = _session(gen, events, 8.0)
    assert tarab_on_time(stats) and inst.mix == 1.0 and inst.last_cc[1] == 127, stats
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
    print(f"P(beta): mod wheel 0 → {before:.3f}, 127 → {after:.3f}")
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
    # No xrun caused by tarab: no callback was late by tarab's doing (too much work, or a wait for
    # the GIL or a lock), and 99 % of them used under half a period of CPU while the flood arrived.
    # Wall-clock times are not bounded here: on this VM a callback with 2 ms of work sometimes ends
    # 8–20 ms after it began because the machine took the vCPU (the engine counts it as preempted or stalled).
    # While the hypervisor steals more than conftest.STEAL_LIMIT_PCT, even CPU times inflate.
    assert stats.faults == 0
    if not steal_too_high(stats):
        assert stats.late_by_tarab == 0 and stats.callback_cpu_max_ms < stats.block_period_ms, stats
        assert stats.callback_cpu_p99_ms < 0.5 * stats.block_period_ms, stats
    assert sent + dropped == len(events)
    n_sysex = sum(1 for _, m in events if m[0] == 0xF0)
    # every message arrived (sysex is ignored by rtmidi). JACK2 runs asynchronously by default: in a
    # cycle whose graph did not finish, a reader gets the previous cycle's buffer again, so during
    # graph xruns a period's events can arrive twice (seen once: 5 extra with 10 graph xruns, steal 6.3 %).
    # Without graph xruns the count is exact; with them the excess is at most one period's events per xrun.
    expected = sent - n_sysex
    assert dropped == 0 and midi.received >= expected, (midi.received, expected)
    per_period = np.bincount(np.array([t for t, _ in events]) // JACK_PERIOD).max()
    assert midi.received - expected <= stats.xruns * per_period, (midi.received, expected, stats.xruns)
    assert midi.malformed > 0
    m = inst.map
    assert inst.last_cc[1] == 77 and inst.mix == pytest.approx(77 / 127)
    assert inst.temperature == pytest.approx(m.temperature_min + (m.temperature_max - m.temperature_min) * 33 / 127)
    assert inst.transpose == 0.0 and not inst.sustain
    assert np.isfinite(cap).all() and np.abs(cap).max() < 1.0
    print(f"flood: sent {sent}, dropped by JACK {dropped}, received {midi.received}, malformed {midi.malformed}; "
          f"graph xruns {stats.xruns}, max callback {stats.callback_max_ms:.2f} ms (CPU {stats.callback_cpu_max_ms:.2f} ms)")


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


def test_play_cli_records_what_was_played(jack_server, tiny_models, tmp_path):
    """`tarab play --json --record`: a note sent from another JACK MIDI client is heard in the file."""
    import json

    import soundfile as sf


    _, _, gen = tiny_models
    attempt = iter(range(3))

    def once():
        out = tmp_path / f"session{next(attempt)}.wav"
        stdout, stderr, code = _play_cli_once(gen, out)
        assert code == 0, stderr
        return out, stdout, json.loads(stdout.splitlines()[-1])

    out, stdout, end = repeat_on_graph_xrun(once, lambda r: r[2])
    lines = [json.loads(x) for x in stdout.splitlines()]
    assert end["event"] == "end" and tarab_on_time(end) and end["faults"] == 0
    status = [x for x in lines if x.get("event") == "status"]
    assert any(v["composer"] == "beta" for s in status for v in s["voices"])  # 61 % 3 == 1
    y, sr = sf.read(out, dtype="float32")
    assert sr == 22050 and len(y) > 4 * sr
    assert not y[: int(0.5 * sr)].any()  # silence before the note
    assert _rms(y) > 1e-3 and np.abs(y).max() < 1.0


def _play_cli_once(gen, out):
    import json
    import os
    import subprocess
    import sys
    import time

    import rtmidi

    from conftest import REPO

    p = subprocess.Popen([sys.executable, "-m", "realtime.cli", "play", "--model", str(gen), "--json", "--seconds", "5",
                          "--record", str(out), "--midi-name", "tarab-cli-in"], cwd=REPO, env=dict(os.environ),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(p.stdout.readline())
        assert ready["event"] == "ready" and ready["midi_api"] == "jack" and ready["composers"] == ["alpha", "beta", "gamma"]
        mo = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, "tarab-test-out")
        try:
            ports = mo.get_ports()
            mo.open_port([i for i, n in enumerate(ports) if "tarab-cli-in" in n][0])
            time.sleep(1.0)
            mo.send_message([0x90, 61, 110])
            time.sleep(1.5)
            mo.send_message([0x80, 61, 0])
        finally:
            mo.delete()
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return stdout, stderr, p.returncode
