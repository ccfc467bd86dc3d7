"""AudioEngine on the JACK dummy server: sample-exact pass-through, latency, xruns, faults."""

import numpy as np
import pytest

from conftest import repeat_on_graph_xrun

from realtime import AudioEngine, LevelMeter, ParameterError, PassThrough, Unit
from realtime.jacktools import measure_delay

pytestmark = pytest.mark.jack


def _noise(seconds, sr, seed=0):
    rng = np.random.default_rng(seed)
    return (0.5 * rng.standard_normal(int(seconds * sr))).clip(-1, 1).astype(np.float32)


def _passthrough_once(jack_probe, sig):
    engine = AudioEngine(LevelMeter(), sr=jack_probe.sr, block_size=256).start()
    try:
        jack_probe.connect_through()
        cap = jack_probe.play_and_record(sig, sig.size + jack_probe.sr // 2)
        stats = engine.stats()
    finally:
        engine.stop()
    return cap, stats, jack_probe.xruns  # the probe counts xruns while it injects and records


def test_live_passthrough_is_sample_exact(jack_probe):
    sr = jack_probe.sr
    sig = _noise(2.0, sr)
    # a dropped JACK period would break the bit-exact comparison: rerun after a graph xrun
    cap, stats, probe_xruns = repeat_on_graph_xrun(lambda: _passthrough_once(jack_probe, sig), lambda r: r[1],
                                                   clean=True)
    delay = measure_delay(sig, cap)
    # the captured signal equals the injected one, bit for bit, after the round trip
    np.testing.assert_array_equal(cap[delay:delay + sig.size], sig)
    assert np.all(cap[:delay] == 0.0)
    # a round trip through JACK is a whole number of periods, at least one
    assert delay % 256 == 0 and 256 <= delay <= 4 * 256
    assert stats.xruns == 0 and stats.faults == 0 and probe_xruns == 0
    assert stats.callbacks > 2.0 * sr / 256 * 0.9
    print(f"round-trip {delay} samples = {delay / sr * 1e3:.1f} ms; {stats.line()}")


def test_callback_fault_is_survived(jack_probe):
    class Boom(Unit):
        calls = 0

        def process(self, block, out=None):
            Boom.calls += 1
            if Boom.calls == 50:
                raise RuntimeError("boom")
            out[:, : block.shape[1]] = block
            return out[:, : block.shape[1]]

    sr = jack_probe.sr
    engine = AudioEngine(Boom(), sr=sr, block_size=256).start()
    try:
        jack_probe.connect_through()
        sig = _noise(1.0, sr, seed=1)
        cap = jack_probe.play_and_record(sig, sig.size + sr // 2)
        calls_after = engine.callbacks
        reason = engine.run(duration=0.3)
        assert engine.callbacks > calls_after  # the stream kept running after the fault
    finally:
        engine.stop()
    assert reason == "duration"
    assert engine.faults == 1 and "boom" in repr(engine.last_fault)
    # the faulty block went out as silence, the rest came through
    delay = measure_delay(sig, cap)
    seg = cap[delay:delay + sig.size]
    assert (seg == sig).mean() > 0.95


def test_unknown_device_and_rate(jack_server):
    with pytest.raises(ParameterError, match="matches no device"):
        AudioEngine(PassThrough(), input_device="no-such-card").start()
    with pytest.raises(ParameterError, match="does not exist"):
        AudioEngine(PassThrough(), input_device=99).start()
    with pytest.raises(ParameterError, match="cannot open at 44100 Hz"):
        AudioEngine(PassThrough(), sr=44100).start()
    with pytest.raises(ParameterError, match="channels"):
        AudioEngine(PassThrough(), in_channels=8, out_channels=8).start()
    with pytest.raises(ParameterError, match="block_size"):
        AudioEngine(PassThrough(), block_size=16)
    with pytest.raises(ParameterError, match="host API"):
        AudioEngine(PassThrough(), host_api="coreaudio").start()
