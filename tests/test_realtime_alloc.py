"""The audio callback path allocates no large arrays: measured with tracemalloc (numpy reports
its data buffers to it)."""

import tracemalloc

import numpy as np
import pytest

from realtime import AudioEngine, Chain, LevelMeter, Recorder
from realtime.classify import ClassifierUnit, load_classifier


def _peak_bytes_per_call(fn, calls=400):
    fn()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(calls):
            fn()
        cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, cur - base


@pytest.mark.parametrize("block", [64, 256, 1024])
def test_engine_callback_with_classifier_does_not_allocate(block):
    unit = Chain([LevelMeter(), Recorder(seconds=5), ClassifierUnit(load_classifier().card)])
    eng = AudioEngine(unit, block_size=block)
    eng.arm()
    data = (0.1 * np.random.default_rng(0).standard_normal(block)).astype(np.float32).tobytes()
    out = []

    def call():
        out.append(eng._callback(data, block, {}, 0)[0])
        out.clear()

    peak, growth = _peak_bytes_per_call(call)
    # only the small objects PyAudio's API needs (input view, output bytes) exist at a time;
    # a window- or frame-sized array (≥ 16 kB) would show here
    assert peak < 4 * block * 4 + 4096, peak
    assert growth < 2048, growth
    assert eng.faults == 0 and eng.callbacks == 401


def test_callback_counts_status_flags():
    import pyaudio

    eng = AudioEngine(LevelMeter(), block_size=256)
    eng.arm()
    z = np.zeros(256, np.float32).tobytes()
    eng._callback(z, 256, {}, pyaudio.paInputOverflow | pyaudio.paOutputUnderflow)
    eng._callback(z, 256, {}, pyaudio.paPrimingOutput)
    s = eng.stats()
    assert (s.input_overflows, s.output_underflows, s.xruns) == (1, 1, 2)
