"""StreamingMel against librosa's batch mel spectrogram (center=False), on any block pattern."""

from pathlib import Path

import librosa
import numpy as np
import pytest

from realtime import ParameterError
from realtime.mel import MelInverse, StreamingMel

CLIPS = Path(__file__).resolve().parent.parent / "realtime" / "clips"


def _ref(y, **kw):
    return librosa.feature.melspectrogram(y=y.astype(np.float64), center=False, power=2.0, **kw)


def _max_db_err(S, ref, floor=1e-10):
    m = ref > floor
    assert m.any()
    return float(np.abs(10 * np.log10(S[m]) - 10 * np.log10(ref[m])).max())


def _stream(sm, y, sizes):
    sm.reset()
    out, i, k = [], 0, 0
    while i < y.size:
        n = int(sizes[k % len(sizes)])
        out.append(sm.process(y[i:i + n]).copy())
        i += n
        k += 1
    return np.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def signal():
    rng = np.random.default_rng(0)
    sr = 22050
    t = np.arange(3 * sr) / sr
    y = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    y[sr:sr + 4000] = 0.0  # a silent gap: low-power frames
    return y.astype(np.float32)


@pytest.mark.parametrize("block", [1, 63, 64, 65, 512, 8193])
def test_fixed_block_sizes_match_librosa(signal, block):
    sm = StreamingMel()
    S = _stream(sm, signal, [block])
    ref = _ref(signal, sr=22050, n_fft=2048, hop_length=512, n_mels=128)
    assert S.shape == ref.shape == (128, sm.n_frames(signal.size))
    assert _max_db_err(S, ref) <= 0.01


def test_random_block_patterns_match_librosa(signal):
    rng = np.random.default_rng(1)
    sm = StreamingMel()
    ref = _ref(signal, sr=22050, n_fft=2048, hop_length=512, n_mels=128)
    for _ in range(5):
        S = _stream(sm, signal, rng.integers(1, 8193, size=64))
        assert _max_db_err(S, ref) <= 0.01


@pytest.mark.parametrize("kw", [dict(n_fft=1024, hop_length=256, n_mels=64, fmin=50.0, fmax=8000.0),
                                dict(n_fft=512, hop_length=512, n_mels=40),
                                dict(n_fft=4096, hop_length=300, n_mels=128, sr=44100)])
def test_other_parameters(signal, kw):
    sr = kw.pop("sr", 22050)
    sm = StreamingMel(sr=sr, **kw)
    S = _stream(sm, signal, [777, 5, 4096])
    ref = _ref(signal, sr=sr, **kw)
    assert S.shape == ref.shape
    assert _max_db_err(S, ref) <= 0.01


def test_real_corpus_audio_matches_librosa():
    import soundfile as sf

    y, sr = sf.read(CLIPS / "dede_efendi.ogg", dtype="float32")
    sm = StreamingMel(sr=sr)
    rng = np.random.default_rng(2)
    S = _stream(sm, y, rng.integers(1, 8193, size=100))
    ref = _ref(y, sr=sr, n_fft=2048, hop_length=512, n_mels=128)
    assert _max_db_err(S, ref) <= 0.01


def test_whole_repeat_and_reset_frame_by_frame(signal):
    """madmom's check: whole signal, again, and hop by hop after reset give the same frames."""
    sm = StreamingMel()
    a = sm.transform(signal)
    b = sm.transform(signal)
    sm.reset()
    c = np.concatenate([sm.process(signal[i:i + 512]).copy() for i in range(0, signal.size, 512)], axis=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_output_buffer_and_frame_counts():
    sm = StreamingMel()
    assert sm.process(np.zeros(2047, np.float32)).shape == (128, 0)
    assert sm.process(np.zeros(1, np.float32)).shape == (128, 1)
    assert sm.process(np.zeros(511, np.float32)).shape == (128, 0)
    out = np.zeros((128, sm.max_frames), np.float32)
    r = sm.process(np.zeros(1 + 512 * 3, np.float32), out=out)
    assert r.shape == (128, 4) and np.shares_memory(r, out)
    assert sm.latency_samples == 2048


@pytest.mark.parametrize("kw,match", [(dict(n_fft=1000), "power of two"), (dict(hop_length=0), "hop_length"),
                                      (dict(n_mels=0), "n_mels"), (dict(fmax=20000.0), "fmax"),
                                      (dict(sr=-1), "sr")])
def test_bad_parameters(kw, match):
    with pytest.raises(ParameterError, match=match):
        StreamingMel(**kw)


def test_mel_inverse_is_consistent_with_the_bank_and_beats_pinv_and_librosa_nnls():
    import soundfile as sf

    y, sr = sf.read(CLIPS / "dede_efendi.ogg", dtype="float32")
    M = _ref(y, sr=sr, n_fft=2048, hop_length=512, n_mels=128)[:, :150]
    B = librosa.filters.mel(sr=sr, n_fft=2048, n_mels=128)

    def db_err(P):  # mean |dB| between the target bands and the bands of the estimate
        m = M > 1e-10
        return float(np.abs(10 * np.log10(np.maximum(B @ P, 1e-30)[m]) - 10 * np.log10(M[m])).mean())

    inv = MelInverse(sr, n_iter=10, max_frames=32)
    P = np.concatenate([inv(M[:, a:a + 32]).copy() for a in range(0, M.shape[1], 32)], axis=1)
    assert P.shape == (1025, M.shape[1]) and P.dtype == np.float32
    assert np.isfinite(P).all() and P.min() >= 0.0
    np.testing.assert_allclose(MelInverse(sr, n_iter=10, max_frames=8)(M), P, rtol=1e-5, atol=1e-12)  # frame by frame
    ours = db_err(P)
    pinv = db_err(np.maximum(np.linalg.pinv(B) @ M, 0.0))  # what the generator did before
    nnls = db_err(librosa.feature.inverse.mel_to_stft(M, sr=sr, n_fft=2048, power=2.0) ** 2)
    assert ours < 1.5 and ours < 0.25 * pinv and ours < 0.25 * nnls, (ours, pinv, nnls)
    assert db_err(MelInverse(sr, n_iter=30)(M)) < 0.7 * ours  # more updates, closer
    with pytest.raises(ParameterError, match="mel_power"):
        inv(np.ones((64, 3), np.float32))
    with pytest.raises(ParameterError, match="out"):
        inv(M[:, :3], out=np.zeros((1025, 4), np.float32))
