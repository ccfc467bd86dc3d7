"""The engine tells why a callback was late: its own work, a wait (GIL), or another thread's turn.

Each case drives ``AudioEngine._callback`` (no device needed) with a unit that makes one callback
late in a known way, and checks which of the engine's late counters that callback went to.
"""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from realtime import AudioEngine, Unit

BLOCK = 256
SR = 22050
PERIOD_NS = int(BLOCK * 1e9 / SR)  # 11.6 ms


class _OneLate(Unit):
    """Pass-through that runs ``action`` in the next call after ``arm_late()``."""

    def __init__(self, action):
        self.action = action
        self.armed = False

    def process(self, block, out=None):
        if self.armed:
            self.armed = False
            self.action()
        n = block.shape[1]
        out[:, :n] = block
        return out[:, :n]


def _late_counts(action, run_in=None):
    """Counters (busy, blocked, preempted, stalled) added by one callback that runs ``action``."""
    unit = _OneLate(action)
    eng = AudioEngine(unit, sr=SR, block_size=BLOCK)
    eng.arm()
    z = np.zeros(BLOCK, np.float32).tobytes()
    eng._callback(z, BLOCK, {}, 0)
    before = eng.stats()
    unit.armed = True
    (run_in or (lambda f: f()))(lambda: eng._callback(z, BLOCK, {}, 0))
    after = eng.stats()
    eng._restore_gc()
    keys = ("late_busy", "late_blocked", "late_preempted", "late_stalled")
    assert after.late_callbacks - before.late_callbacks == 1, after  # the armed callback was late
    assert after.callback_max_ms * 1e6 > PERIOD_NS
    return tuple(getattr(after, k) - getattr(before, k) for k in keys), after


def test_too_much_work_is_busy():
    def spin_cpu():
        c = time.thread_time_ns()
        while time.thread_time_ns() - c < 1.5 * PERIOD_NS:
            pass

    counts, st = _late_counts(spin_cpu)
    assert counts == (1, 0, 0, 0), st
    assert st.callback_cpu_max_ms * 1e6 > PERIOD_NS and st.late_by_tarab == 1


def _list_that_sorts_in(seconds):
    """A list of floats whose ``sorted()`` takes at least ``seconds`` on this machine."""
    n = 50_000
    while True:
        data = np.random.default_rng(0).random(n).tolist()
        t0 = time.perf_counter()
        sorted(data)
        if time.perf_counter() - t0 >= seconds:
            return data
        n *= 2


def test_waiting_for_the_gil_is_blocked():
    """A worker that takes the GIL and keeps it in one long C call (a sort) holds the callback up."""
    data = _list_that_sorts_in(0.04)  # 3.4 periods
    ready, go, started, done = (threading.Event() for _ in range(4))

    def worker():
        ready.set()
        while not go.is_set():  # runnable and asking for the GIL, so the hand-over is quick
            pass
        started.set()
        sorted(data)  # one C call: the GIL is not handed back until it ends
        done.set()

    # A thread waiting for the GIL wakes every switch interval to ask again (30-100 µs of CPU each
    # here), so the wait costs the callback some CPU of its own: 2 ms keeps it to a few ms.
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.002)
    t = threading.Thread(target=worker)
    t.start()
    ready.wait()

    def wait_in_bytecode():
        go.set()
        while not started.is_set():  # the GIL goes to the worker within a switch interval
            pass

    try:
        counts, st = _late_counts(wait_in_bytecode)
    finally:
        go.set()
        t.join()
        sys.setswitchinterval(old)
    assert done.is_set()
    print(f"waiting for the GIL: callback {st.callback_max_ms:.1f} ms, its CPU {st.callback_cpu_max_ms:.2f} ms")
    assert counts == (0, 1, 0, 0), st
    assert st.callback_cpu_max_ms * 1e6 < PERIOD_NS and st.late_by_tarab == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_another_process_on_the_cpu_is_preempted():
    """The callback thread at nice 19 shares one CPU with a busy process: it is preempted, not busy."""
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        time.sleep(0.2)  # the hog is running

        def spin_wall():
            t0 = time.perf_counter_ns()
            while time.perf_counter_ns() - t0 < 1.5 * PERIOD_NS:
                pass

        def pinned_low(fn):
            def body():
                os.sched_setaffinity(0, {cpu})
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
                time.sleep(0.1)  # the main thread reaches join() and wants the GIL no more
                fn()

            th = threading.Thread(target=body)
            th.start()
            th.join()

        counts, st = _late_counts(spin_wall, run_in=pinned_low)
    finally:
        hog.kill()
        hog.wait()
    assert counts == (0, 0, 1, 0), st
    assert st.late_by_tarab == 0
