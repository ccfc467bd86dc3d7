"""StreamingMel cost per frame against librosa (one call per hop) and a plain numpy frame."""

from __future__ import annotations

import time

import numpy as np


def _best(fn, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(seconds: float = 30.0) -> dict:
    import librosa

    from realtime.mel import StreamingMel

    sr, n_fft, hop, n_mels = 22050, 2048, 512, 128
    y = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * sr))).astype(np.float32)
    sm = StreamingMel(sr=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    n_frames = sm.n_frames(y.size)
    out = np.zeros((n_mels, sm.max_frames), np.float32)

    def stream():
        sm.reset()
        for a in range(0, y.size, 256):  # the live block size
            sm.process(y[a:a + 256], out=out)

    def stream_hop():  # one call per hop: the same call pattern as the librosa loop below
        sm.reset()
        for a in range(0, y.size, hop):
            sm.process(y[a:a + hop], out=out)

    def stream_big():  # 8192-sample blocks: the kernel's own cost, call overhead amortised
        sm.reset()
        for a in range(0, y.size, 8192):
            sm.process(y[a:a + 8192], out=out)

    # librosa: one call per hop on the latest n_fft samples (what a naive live loop does)
    k = 200
    wins = [y[i * hop:i * hop + n_fft] for i in range(k)]
    librosa.feature.melspectrogram(y=wins[0], sr=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels, center=False)

    def lib():
        for w in wins:
            librosa.feature.melspectrogram(y=w, sr=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels, center=False)

    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)

    def npframe():
        for w in wins:
            X = np.fft.rfft(window * w)
            basis @ (X.real ** 2 + X.imag ** 2)

    # Rounds of all four, interleaved, so that each ratio compares timings taken under the same
    # machine load (this VM's speed drifts by tens of percent over minutes); each figure is the
    # median over the rounds of the per-round value (each itself the best of 2 repetitions).
    rounds = {"ours": [], "ours_hop": [], "ours_big": [], "lib": [], "np": []}
    for _ in range(7):
        rounds["ours"].append(_best(stream, 2) / n_frames)
        rounds["ours_hop"].append(_best(stream_hop, 2) / n_frames)
        rounds["ours_big"].append(_best(stream_big, 2) / n_frames)
        rounds["lib"].append(_best(lib, 2) / k)
        rounds["np"].append(_best(npframe, 2) / k)
    r = {key: np.array(v) for key, v in rounds.items()}
    ours, ours_hop, ours_big, t_lib, t_np = (float(np.median(r[key])) for key in ("ours", "ours_hop", "ours_big", "lib", "np"))
    return {"streaming_mel_us_per_frame": ours * 1e6, "streaming_mel_us_per_frame_hop_blocks": ours_hop * 1e6,
            "streaming_mel_us_per_frame_8192_blocks": ours_big * 1e6, "librosa_us_per_window": t_lib * 1e6,
            "numpy_frame_us": t_np * 1e6, "speedup_vs_librosa": float(np.median(r["lib"] / r["ours"])),
            "speedup_vs_numpy_frame": float(np.median(r["np"] / r["ours"])),
            "frames": n_frames}
