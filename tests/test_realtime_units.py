import numpy as np
import pytest

from realtime import Chain, LevelMeter, ParameterError, PassThrough, Recorder, Unit


class Gain(Unit):
    def __init__(self, g, latency=0):
        super().__init__()
        self.g = g
        self.latency_samples = latency

    def process(self, block, out=None):
        out = np.empty_like(block) if out is None else out[:, : block.shape[1]]
        np.multiply(block, self.g, out=out)
        return out


def test_chain_runs_in_order_and_sums_latency():
    c = Chain([Gain(2.0, 3), Gain(0.5, 4), Gain(3.0)]).prepare(22050, 256, 2)
    x = np.random.default_rng(0).standard_normal((2, 100)).astype(np.float32)
    out = np.zeros((2, 256), np.float32)
    y = c.process(x, out=out)
    np.testing.assert_allclose(y, 3.0 * x, rtol=1e-6)
    assert np.shares_memory(y, out) and c.latency_samples == 7


@pytest.mark.parametrize("n", [1, 63, 64, 65, 256])
def test_block_sizes_pass_through(n):
    c = Chain([LevelMeter(), Recorder(1.0), PassThrough()]).prepare(22050, 256, 1)
    x = np.arange(n, dtype=np.float32)[None] / 1000
    np.testing.assert_array_equal(c.process(x, out=np.zeros((1, 256), np.float32)), x)
    np.testing.assert_array_equal(c.units[1].drain(), x)


def test_level_meter_values():
    m = LevelMeter().prepare(22050, 256)
    m.process(np.full((1, 256), 0.5, np.float32))
    m.process(np.full((1, 256), -1.0, np.float32))
    peak, rms = m.read_and_clear()
    assert peak == pytest.approx(0.0) and rms == pytest.approx(10 * np.log10((0.25 + 1) / 2))
    assert m.read_and_clear() == (float("-inf"), float("-inf"))


def test_prepare_validates():
    with pytest.raises(ParameterError, match="block_size"):
        PassThrough().prepare(22050, 0)
    with pytest.raises(ParameterError, match="sr"):
        PassThrough().prepare(10, 256)
    with pytest.raises(ParameterError, match="seconds"):
        Recorder(seconds=0)
