"""Generation, rendering and MIDI-play benchmarks (ratios and distributions measured in one run)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .mel import _best as _best_of

REPO = Path(__file__).resolve().parent.parent
CLIP = REPO / "realtime" / "clips" / "demo.ogg"


def run_decoding(seconds: float = 30.0) -> dict:
    """Latent → audio with the shipped generator (1 thread) vs librosa's Griffin-Lim on the same length."""
    import librosa
    import torch

    from models.data import load_audio
    from realtime.generate import StyleSynth, load_generator
    from realtime.phase import PhaseReconstructor, spectral_convergence, stft_magnitude

    torch.set_num_threads(1)
    synth = StyleSynth(load_generator())
    sr = synth.sr
    n = int(seconds * sr)

    def gen():
        synth.set_target(synth.labels[0])
        synth.start(0)
        synth.render(n)

    gen()
    t_gen = _best_of(gen, 3)
    y = load_audio(CLIP, sr)[: int(20 * sr)]
    S = stft_magnitude(y)
    audio_s = len(y) / sr
    pr = PhaseReconstructor(n_iter=synth.phase.n_iter, max_frames=synth.hop_frames)

    def ours():
        out = [pr.process(S[:, a:a + synth.hop_frames]) for a in range(0, S.shape[1], synth.hop_frames)]
        out.append(pr.flush())
        ours.y = np.concatenate(out)

    ours()
    t_ours = _best_of(ours, 3)
    gl = librosa.griffinlim(S, n_iter=32, hop_length=512, n_fft=2048, center=False, momentum=0.0)  # also warms up
    t_gl = _best_of(lambda: librosa.griffinlim(S, n_iter=32, hop_length=512, n_fft=2048, center=False, momentum=0.0), 3)
    fgl = librosa.griffinlim(S, n_iter=32, hop_length=512, n_fft=2048, center=False)
    return {"decode_x_realtime": seconds / t_gen, "decode_seconds": seconds,
            "phase_only_x_realtime": audio_s / t_ours, "librosa_gl32_x_realtime": audio_s / t_gl,
            "speedup_vs_librosa_gl32": t_gl / t_ours,
            "phase_iterations": synth.phase.n_iter,
            "sc_ours": spectral_convergence(S, stft_magnitude(ours.y)),
            "sc_librosa_gl32": spectral_convergence(S, stft_magnitude(gl)),
            "sc_librosa_fgl32": spectral_convergence(S, stft_magnitude(fgl))}


def run_render(minutes: float = 2.0) -> dict:
    """`render_file` speed on one core, without and with the generated layer (setup excluded)."""
    import soundfile as sf
    import torch

    from models.data import load_audio
    from realtime.classify import load_classifier
    from realtime.generate import load_generator
    from realtime.presets import load_preset
    from realtime.render import render_file

    torch.set_num_threads(1)
    sr = 22050
    y = load_audio(CLIP, sr)
    long = np.tile(y, int(np.ceil(minutes * 60 * sr / len(y))))[: int(minutes * 60 * sr)]
    preset, cls, gen = load_preset("default"), load_classifier(), load_generator()
    res = {}
    with tempfile.TemporaryDirectory() as d:
        short_f, long_f = Path(d) / "short.wav", Path(d) / "long.wav"
        sf.write(short_f, long[: 10 * sr], sr)
        sf.write(long_f, long, sr)
        for name, kw in (("no_layer", {}), ("with_layer", {"layer": "auto", "generator": gen})):
            times = {}
            for f in (short_f, long_f):
                render_file(f, Path(d) / "warm.wav", preset=preset, classifier=cls, force=True, progress=False, **kw)
                t = time.perf_counter()
                render_file(f, Path(d) / "o.wav", preset=preset, classifier=cls, force=True, progress=False, **kw)
                times[f] = time.perf_counter() - t
            marginal = (times[long_f] - times[short_f]) / (len(long) / sr - 10.0)
            res[name] = {"x_realtime": 1.0 / marginal, "whole_file_x_realtime": len(long) / sr / times[long_f]}
    res["minutes"] = minutes
    return res


def run_play(notes: int = 100, voices_seconds: float = 10.0) -> dict:
    """Note-on → first generated sample through JACK (JACK MIDI in, JACK audio out), and the
    callback time with 4 voices sounding."""
    import torch

    from realtime import AudioEngine
    from realtime.generate import load_generator
    from realtime.jacktools import JackProbe, dummy_server
    from realtime.midi import MidiInput
    from realtime.play import build_player
    from realtime.presets import load_preset

    torch.set_num_threads(1)
    sr, period = 22050, 256
    name = f"tarab-bench-play-{os.getpid()}"
    with dummy_server(name, sr=sr, period=period):
        os.environ["JACK_DEFAULT_SERVER"] = name
        probe = JackProbe("tarab-bench-probe", midi=True)
        with tempfile.TemporaryDirectory() as d:  # short release and no FX: silence before every note-on
            pf = Path(d) / "bench.toml"
            pf.write_text('description = "bench"\n[midi]\nrelease_s = 0.05\n')
            preset = load_preset(pf)
        inst, chain = build_player(preset, load_generator(), sr=sr, block_size=period)
        midi = MidiInput(inst.handle, virtual=True, name="tarab-bench-in", api="jack", on_idle=inst.apply)
        inst.start()
        engine = AudioEngine(chain, sr=sr, block_size=period).start()
        midi.start()
        try:
            probe.connect_through()
            probe.connect_midi("tarab-bench-in.*")
            gap = int(0.5 * sr)  # a note every 0.5 s, released after 0.25 s (release 0.05 s)
            events = []
            for k in range(notes):
                t0 = int(0.3 * sr) + k * gap
                note = 48 + (k * 5) % 24
                events += [(t0, [0x90, note, 110]), (t0 + int(0.25 * sr), [0x80, note, 0])]
            n_rec = int(0.3 * sr) + notes * gap + sr
            cap = probe.play_and_record(np.zeros(1, np.float32), n_rec, midi=events, timeout=n_rec / sr + 30)
            lat_stats = engine.stats()
            # 4 voices held, then the callback time
            hold = [(int(0.1 * sr) + i * 50, [0x90, 60 + i, 100]) for i in range(4)]
            engine_cb_before = engine.stats().callbacks
            probe.play_and_record(np.zeros(1, np.float32), int(voices_seconds * sr), midi=hold,
                                  timeout=voices_seconds + 30)
            st = engine.stats(recent=engine.stats().callbacks - engine_cb_before)
            sounding = sum(1 for v in inst.voices if v.target > 0)
        finally:
            engine.stop()
            midi.close()
            inst.stop()
            probe.close()
    lat = []
    for t0, msg in events:
        if msg[0] != 0x90:
            continue
        seg = np.abs(cap[t0:t0 + int(0.5 * sr)])
        nz = np.flatnonzero(seg > 1e-5)
        if len(nz):
            lat.append(nz[0] / sr * 1000.0)
    lat = np.array(lat)
    return {"notes": notes, "notes_heard": int(len(lat)), "latency_ms_median": float(np.median(lat)),
            "latency_ms_p90": float(np.percentile(lat, 90)), "latency_ms_max": float(lat.max()),
            "latency_ms_min": float(lat.min()), "round_trip_ms": lat_stats.total_latency_ms,
            "xruns_notes": lat_stats.xruns, "voices_sounding": sounding,
            "callback_p999_pct_4_voices": 100.0 * st.callback_p999_ms / st.block_period_ms,
            "callback_median_pct_4_voices": 100.0 * st.callback_median_ms / st.block_period_ms,
            "xruns_4_voices": st.xruns - lat_stats.xruns}
