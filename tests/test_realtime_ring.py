import numpy as np

from realtime import Ring


def test_write_read_wraps_in_order():
    r = Ring(2, 10)
    data = np.arange(2 * 37, dtype=np.float32).reshape(2, 37)
    got = []
    out = np.zeros((2, 4), np.float32)
    for a in range(0, 37, 3):
        r.write(data[:, a:a + 3])
        while (n := r.read_into(out)):
            got.append(out[:, :n].copy())
    np.testing.assert_array_equal(np.concatenate(got, 1), data)
    assert r.overruns == 0


def test_overrun_is_counted_and_reader_resumes_at_oldest():
    r = Ring(1, 8)
    r.write(np.arange(20, dtype=np.float32)[None])
    assert r.overruns == 12
    out = np.zeros((1, 8), np.float32)
    assert r.read_into(out) == 8
    np.testing.assert_array_equal(out[0], np.arange(12, 20))


def test_peek_window_and_guard():
    r = Ring(1, 16, guard=4)
    r.write(np.arange(30, dtype=np.float32)[None])
    out = np.zeros((1, 5), np.float32)
    assert r.peek(30, out) and out[0].tolist() == [25, 26, 27, 28, 29]
    assert not r.peek(31, out)  # not written yet
    assert not r.peek(19, out)  # too old: within the guard band of the producer
    assert r.peek(23, out) and out[0].tolist() == [18, 19, 20, 21, 22]
