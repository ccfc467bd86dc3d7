"""Engine benchmarks on a JACK dummy server: pass-through round trip and callback time with the
classifier worker running; classifier inference cost on one thread."""

from __future__ import annotations

import time

import numpy as np


def run_classifier_inference(n: int = 200) -> dict:
    import torch

    from realtime.classify import load_classifier

    torch.set_num_threads(1)
    b = load_classifier()
    c = b.card
    x = torch.rand(1, c.n_mels, c.window_frames) * 1e-3
    with torch.inference_mode():
        for _ in range(10):
            b.module(x)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            b.module(x)
            ts.append(time.perf_counter() - t)
    ts = np.array(ts) * 1e3
    return {"inference_ms_median": float(np.median(ts)), "inference_ms_p99": float(np.percentile(ts, 99)),
            "params": b.card.metrics.get("params")}


def run_live(seconds: float = 20.0, block: int = 256) -> dict:
    import soundfile as sf

    from realtime import AudioEngine, Chain, LevelMeter
    from realtime.classify import ClassifierUnit, ClassifierWorker, Estimator, load_classifier
    from realtime.commands import DEMO_CLIP
    from realtime.jacktools import JackProbe, dummy_server, measure_delay

    out = {}
    with dummy_server(sr=22050, period=block):
        b = load_classifier()
        unit = ClassifierUnit(b.card)
        eng = AudioEngine(Chain([LevelMeter(), unit]), sr=22050, block_size=block).start()
        est = Estimator(b, unit, rate_hz=4.0)
        worker = ClassifierWorker(est)
        probe = JackProbe("tarab-bench")
        try:
            probe.connect_through()
            clip, sr = sf.read(DEMO_CLIP, dtype="float32")
            sig = np.tile(clip, int(np.ceil(seconds * sr / clip.size)))[: int(seconds * sr)]
            worker.start()
            t0 = time.monotonic()
            cap = probe.play_and_record(sig, sig.size + 4 * block)
            wall = time.monotonic() - t0
            worker.stop()
            st = eng.stats()
            delay = measure_delay(sig, cap)
        finally:
            probe.close()
            eng.stop()
        period = block / 22050 * 1e3
        out.update({
            "block": block, "round_trip_samples": delay, "round_trip_ms": delay / 22050 * 1e3,
            "reported_latency_ms": st.total_latency_ms, "xruns": st.xruns, "faults": st.faults,
            "callback_median_pct": st.callback_median_ms / period * 100,
            "callback_p99_pct": st.callback_p99_ms / period * 100,
            "callback_p999_pct": st.callback_p999_ms / period * 100,
            "callback_max_pct": st.callback_max_ms / period * 100,
            "callback_median_us": st.callback_median_ms * 1e3, "callback_p999_us": st.callback_p999_ms * 1e3,
            "callback_cpu_p99_pct": st.callback_cpu_p99_ms / period * 100,
            "callback_cpu_max_pct": st.callback_cpu_max_ms / period * 100,
            "late_callbacks": st.late_callbacks, "late_by_tarab": st.late_by_tarab, "steal_pct": st.steal_pct,
            "estimates": len(est.estimates),
            "estimates_per_s": (len(est.estimates) - 1) / (est.estimates[-1].wall_time - est.estimates[0].wall_time),
            "configured_rate_hz": est.rate_hz,
            "worker_cpu_share_of_core": worker.busy_s / wall, "skipped_windows": est.skipped,
        })
    return out
