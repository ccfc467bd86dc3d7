"""``AudioEngine``: a PortAudio full-duplex callback stream that drives a :class:`~realtime.units.Unit`.

The callback deinterleaves the input into a preallocated ``(channels, n)`` block, calls
``unit.process(block, out=...)``, interleaves the result and hands it back to PortAudio. It
takes no lock, does no file or console I/O and never calls torch; the only objects it creates
are the small ones PyAudio's API requires (a view of the input bytes and the output ``bytes``)
and the thread's usage record from ``getrusage``, which tells why a late callback was late.
Faults inside ``process`` are counted and answered with silence for that block; the main
thread logs them. Xruns are counted from PortAudio's status flags.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from models.errors import ParameterError, check_range

from .devices import AudioDevices, DeviceError
from .units import MAX_BLOCK, MIN_BLOCK, Unit

log = logging.getLogger(__name__)

try:  # a thread's context switches (Linux); elsewhere late callbacks cannot be told apart by cause
    from resource import RUSAGE_THREAD, getrusage
except ImportError:
    RUSAGE_THREAD = None

SWITCH_INTERVAL_S = 0.001

__all__ = ["AudioEngine", "EngineStats", "DEFAULT_SR", "DEFAULT_BLOCK"]

DEFAULT_SR = 22050
DEFAULT_BLOCK = 256
TIMING_HISTORY = 1 << 16  # callback durations kept for statistics
WATCHDOG_S = 2.0  # no callback for this long after the first one: the device is gone
# Streams whose audio server vanished. PortAudio's close (and so their finaliser) would block
# forever; a process holding any should leave with os._exit after flushing (the CLI does).
ABANDONED: list = []


@dataclass
class EngineStats:
    """A snapshot of the engine's counters (all times in milliseconds).

    ``callback_*_ms`` are wall-clock durations of the callback; ``callback_cpu_*_ms`` the CPU time
    its thread used in it (the work alone). A callback longer than its period is *late*, and is
    counted under the first of: ``late_busy`` (its CPU time exceeded the period: too much work),
    ``late_blocked`` (its thread slept: it waited for the GIL, a lock or a page read),
    ``late_preempted`` (another thread or process ran in its place; under JACK the callback thread
    is SCHED_FIFO, so only real-time threads and interrupts can) and ``late_stalled`` (no switch
    at all: the hypervisor took the virtual CPU, which the kernel accounts as steal time). The
    first two are tarab's doing (:attr:`late_by_tarab`), the last two the machine's. Where a
    thread's switches cannot be read (``RUSAGE_THREAD`` is Linux's), a late callback that was not
    busy counts as blocked.
    ``steal_pct`` is the share of this machine's CPU time that its hypervisor took while the
    stream ran (Linux ``/proc/stat``; 0 on bare metal): above a few percent no guest can keep a
    real-time deadline, and the late counters say more about the host than about tarab.
    """

    sr: int
    block_size: int
    callbacks: int
    frames: int
    xruns: int
    input_overflows: int
    input_underflows: int
    output_underflows: int
    output_overflows: int
    faults: int
    input_latency_ms: float
    output_latency_ms: float
    engine_latency_ms: float
    total_latency_ms: float
    callback_median_ms: float
    callback_p99_ms: float
    callback_p999_ms: float
    callback_max_ms: float
    block_period_ms: float
    callback_cpu_p99_ms: float = 0.0
    callback_cpu_max_ms: float = 0.0
    late_callbacks: int = 0
    late_busy: int = 0
    late_blocked: int = 0
    late_preempted: int = 0
    late_stalled: int = 0
    steal_pct: float = 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "late_by_tarab": self.late_by_tarab}

    @property
    def late_by_tarab(self) -> int:
        """Late callbacks that were tarab's doing: too much work, or a wait (GIL, lock, page read)."""
        return self.late_busy + self.late_blocked

    def line(self) -> str:
        """One human-readable status line."""
        pct = 100.0 / self.block_period_ms if self.block_period_ms else 0.0
        return (f"{self.sr} Hz, block {self.block_size} | latency in {self.input_latency_ms:.1f} + "
                f"engine {self.engine_latency_ms:.1f} + out {self.output_latency_ms:.1f} = "
                f"{self.total_latency_ms:.1f} ms | callback p50 {self.callback_median_ms * pct:.1f}% "
                f"p99.9 {self.callback_p999_ms * pct:.1f}% (CPU max {self.callback_cpu_max_ms * pct:.1f}%) "
                f"of {self.block_period_ms:.1f} ms | xruns {self.xruns} | late {self.late_callbacks} "
                f"({self.late_by_tarab} tarab's) | steal {self.steal_pct:.1f}% | faults {self.faults}")


class AudioEngine:
    """Runs ``unit`` on a live full-duplex audio stream.

    Parameters
    ----------
    unit : Unit
        The processor; it is prepared with ``(sr, block_size, in_channels)``.
    sr : int
        Sample rate [Hz]; the devices must open at it (see ``tarab devices``).
    block_size : int in [32, 4096]
        Frames per callback [samples].
    input_device, output_device : None, int or str
        Index or name substring; None for the default (JACK's when a JACK server runs).
    host_api : str or None
        Restrict devices to a host API (e.g. ``"jack"``, ``"alsa"``).
    in_channels, out_channels : int
        Channel counts. Output channel ``c`` carries the unit's channel ``c % unit_channels``.

    Notes
    -----
    ``start()`` opens the stream; ``run()`` blocks until a duration ends, Ctrl-C, SIGTERM,
    or the audio server goes away, and returns why; ``stop()`` closes everything.

    Examples
    --------
    >>> from realtime import AudioEngine, PassThrough          # doctest: +SKIP
    >>> with AudioEngine(PassThrough(), block_size=256) as eng:  # doctest: +SKIP
    ...     eng.run(duration=5.0)
    ...     print(eng.stats().line())
    """

    def __init__(self, unit: Unit, *, sr: int = DEFAULT_SR, block_size: int = DEFAULT_BLOCK,
                 input_device=None, output_device=None, host_api: str | None = None,
                 in_channels: int = 1, out_channels: int = 1):
        self.unit = unit
        self.sr = check_range("sr", sr, 8000, 192000, kind=int)
        self.block_size = check_range("block_size", block_size, MIN_BLOCK, 4096, kind=int)
        self.in_channels = check_range("in_channels", in_channels, 1, 64, kind=int)
        self.out_channels = check_range("out_channels", out_channels, 1, 64, kind=int)
        if self.in_channels != self.out_channels:
            # PyAudio opens a duplex stream with one channel count for both directions
            raise ParameterError(f"out_channels: {self.out_channels} differs from in_channels "
                                 f"{self.in_channels}; a duplex stream needs them equal")
        self._spec = (input_device, output_device, host_api)
        self.devices = None
        self.stream = None
        self.input_device = None
        self.output_device = None
        # preallocated buffers for the callback
        self._in = np.zeros((self.in_channels, MAX_BLOCK), np.float32)
        self._y = np.zeros((self.in_channels, MAX_BLOCK), np.float32)
        self._obuf = np.zeros(MAX_BLOCK * self.out_channels, np.float32)
        self._cb_ns = np.zeros(TIMING_HISTORY, np.int64)
        self._cpu_ns = np.zeros(TIMING_HISTORY, np.int64)
        # late callbacks: busy (CPU time > period), blocked (waited: GIL, lock, page read),
        # preempted (another thread of this machine ran), stalled (no switch: the VM's CPU was away)
        self._late = np.zeros(4, np.int64)
        self._period_ns = int(self.block_size * 1e9 / self.sr)
        self._cpu0 = None  # cpu_ticks() when the stream started
        self._flags = np.zeros(5, np.int64)  # in-underflow, in-overflow, out-underflow, out-overflow, priming
        self.callbacks = 0
        self.frames = 0
        self.faults = 0
        self.last_fault: BaseException | None = None
        self._last_cb_t = 0.0
        self._stop = threading.Event()
        self.stop_reason = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "AudioEngine":
        """Resolve devices, prepare the unit (allocations, warm-up), open and start the stream.

        Raises
        ------
        ParameterError, DeviceError
            Unknown device, unsupported rate/channels, no audio server.
        """
        input_device, output_device, host_api = self._spec
        # The callback needs the GIL; a busy worker holds it up to the switch interval (5 ms by
        # default, almost half a 256-sample period). 1 ms bounds that wait.
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.devices = AudioDevices(host_api)
        try:
            self.input_device = self.devices.resolve(input_device, "input")
            self.output_device = self.devices.resolve(output_device, "output")
            self.devices.check_format(self.sr, self.input_device, self.in_channels,
                                      self.output_device, self.out_channels)
            self.arm()
            pa = self.devices.pyaudio
            try:
                self.stream = self.devices.pa.open(
                    rate=self.sr, format=pa.paFloat32, channels=self.in_channels,
                    input=True, output=True, input_device_index=self.input_device["index"],
                    output_device_index=self.output_device["index"], frames_per_buffer=self.block_size,
                    stream_callback=self._callback, start=False)
            except (OSError, ValueError) as e:
                raise DeviceError(f"cannot open audio stream: {e}") from None
            self.stream.start_stream()
            self._cpu0 = cpu_ticks()
        except BaseException:
            self.stop()
            raise
        return self

    def arm(self) -> None:
        """Prepare the unit (allocations) and run the callback path on silence (kernel compilation).

        ``start`` calls it; it needs no device, so tests can drive ``_callback`` directly.
        """
        import pyaudio as pa

        self._flag_bits = (pa.paInputUnderflow, pa.paInputOverflow, pa.paOutputUnderflow,
                           pa.paOutputOverflow, pa.paPrimingOutput)
        self._continue = pa.paContinue
        self.unit.prepare(self.sr, self.block_size, self.in_channels)
        self._warm_up()
        # A full garbage collection of a big heap stops every Python thread for tens of ms, the
        # callback included. Collect now, and move what exists to the permanent generation so
        # later collections only scan objects made after the stream started.
        # While the stream runs, automatic collection is off (cycles wait until stop()).
        gc.collect()
        gc.freeze()
        if gc.isenabled():
            gc.disable()
            self._gc_was_enabled = True


    def _warm_up(self) -> None:
        """Run the callback path once on silence so kernels are compiled before the stream."""
        self.unit.set_warm_up(True)
        try:
            for _ in range(2):
                self._process(self.block_size)
        finally:
            self.unit.set_warm_up(False)
        self.unit.reset()

    def _restore_gc(self) -> None:
        if getattr(self, "_gc_was_enabled", False):
            self._gc_was_enabled = False
            gc.enable()


    def stop(self) -> None:
        """Stop and close the stream and release PortAudio (safe to call twice).

        After the audio server vanished, PortAudio's close would wait forever for it, so the
        stream is abandoned instead (the process is about to exit or reopen anyway).
        """
        self._restore_gc()
        if self.stop_reason == "server-lost":
            log.debug("audio server lost: abandoning the stream without closing it")
            ABANDONED.append((self.stream, self.devices))  # never collected: their dealloc would hang
            self.stream = None
            self.devices = None
            return
        if self.stream is not None:
            try:
                if self.stream.is_active():
                    self.stream.stop_stream()
            except (OSError, ValueError):
                pass
            try:
                self.stream.close()
            except (OSError, ValueError):
                pass
            self.stream = None
        if self.devices is not None:
            self.devices.close()
            self.devices = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- real-time path -----------------------------------------------------------------
    def _process(self, n: int) -> None:
        """Run the unit over the first ``n`` input frames into ``self._obuf`` (interleaved)."""
        bs = self.block_size
        och, ich = self.out_channels, self.in_channels
        out = self._obuf[: n * och].reshape(n, och)
        for off in range(0, n, bs):
            m = min(bs, n - off)
            y = self.unit.process(self._in[:, off:off + m], out=self._y[:, :m])
            for c in range(och):
                out[off:off + m, c] = y[c % ich]

    def _callback(self, in_data, frame_count, time_info, status):
        ru0 = getrusage(RUSAGE_THREAD) if RUSAGE_THREAD is not None else None
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        n = frame_count
        och, ich = self.out_channels, self.in_channels
        try:
            if status:
                for i, bit in enumerate(self._flag_bits):
                    if status & bit:
                        self._flags[i] += 1
            if n > MAX_BLOCK:
                raise ParameterError(f"callback frame count {n} > {MAX_BLOCK}")
            if in_data is not None:
                x = np.frombuffer(in_data, np.float32)
                self._in[:, :n] = x[: n * ich].reshape(n, ich).T
            else:
                self._in[:, :n] = 0.0
            self._process(n)
            data = self._obuf[: n * och].tobytes()
        except BaseException as e:  # never let an exception kill the stream
            self.faults += 1
            self.last_fault = e
            self._obuf[: min(n, MAX_BLOCK) * och] = 0.0
            data = self._obuf[: min(n, MAX_BLOCK) * och].tobytes()
        self.frames += n
        wall = time.perf_counter_ns() - t0
        cpu = time.thread_time_ns() - c0
        i = self.callbacks % TIMING_HISTORY
        self._cb_ns[i] = wall
        self._cpu_ns[i] = cpu
        if wall > self._period_ns:
            self._classify_late(cpu, ru0)
        self.callbacks += 1
        self._last_cb_t = time.monotonic()
        return data, self._continue

    def _classify_late(self, cpu_ns: int, ru0) -> None:
        """Count a callback that overran its period, by why (its thread's CPU time and switches).

        With paravirtual steal-time accounting a thread's CPU time leaves out the time its vCPU
        was taken by the hypervisor, so a callback that used less CPU than its period and never
        switched was held up by the machine, not by tarab.
        """
        late = self._late
        ru1 = getrusage(RUSAGE_THREAD) if ru0 is not None else None
        if cpu_ns > self._period_ns:
            late[0] += 1  # tarab's work did not fit the period
        elif ru1 is None or ru1.ru_nvcsw > ru0.ru_nvcsw:
            late[1] += 1  # the thread slept (GIL held by a worker, a lock, a page read), or unknown
        elif ru1.ru_nivcsw > ru0.ru_nivcsw:
            late[2] += 1  # another thread or process took the CPU
        else:
            late[3] += 1  # no switch at all: the virtual CPU itself was stalled

    # ---- control ------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Ask :meth:`run` to return (thread- and signal-safe)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    def run(self, duration: float | None = None, on_tick=None, tick_hz: float = 10.0) -> str:
        """Block while the stream runs; return why it ended.

        Parameters
        ----------
        duration : float or None
            Seconds to run; None runs until interrupted.
        on_tick : callable(engine) or None
            Called ``tick_hz`` times a second from this thread (displays, logging).

        Returns
        -------
        str
            ``'duration'``, ``'interrupted'`` (SIGINT), ``'terminated'`` (SIGTERM),
            ``'stopped'`` (:meth:`request_stop`) or ``'server-lost'``.
        """
        if self.stream is None:
            raise DeviceError("engine not started")
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig, reason in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")):
                old[sig] = signal.signal(sig, lambda *_a, r=reason: self.request_stop(r))
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)  # let the audio thread take the GIL sooner
        t_end = None if duration is None else time.monotonic() + duration
        faults_seen = 0
        try:
            while not self._stop.wait(1.0 / tick_hz):
                now = time.monotonic()
                if self.faults != faults_seen:
                    log.warning("audio callback fault (%d so far, block answered with silence): %r",
                                self.faults, self.last_fault)
                    faults_seen = self.faults
                if not self.stream.is_active():
                    self.request_stop("server-lost")
                elif self.callbacks and now - self._last_cb_t > WATCHDOG_S:
                    self.request_stop("server-lost")
                elif t_end is not None and now >= t_end:
                    self.request_stop("duration")
                if on_tick is not None and not self._stop.is_set():
                    on_tick(self)
        finally:
            sys.setswitchinterval(old_switch)
            for sig, h in old.items():
                signal.signal(sig, h)
        return self.stop_reason or "stopped"

    # ---- reporting ----------------------------------------------------------------------
    @property
    def xruns(self) -> int:
        """Xruns so far (cheap: for per-update displays; :meth:`stats` computes percentiles)."""
        return int(self._flags[:4].sum())

    def _recent_ms(self, ns: np.ndarray, recent: int | None) -> np.ndarray:
        n = min(self.callbacks, TIMING_HISTORY)
        if recent is not None and recent < n:
            end = self.callbacks % TIMING_HISTORY
            idx = np.arange(end - recent, end) % TIMING_HISTORY
            return ns[idx].astype(np.float64) / 1e6
        return ns[:n].astype(np.float64) / 1e6

    def callback_times_ms(self, recent: int | None = None) -> np.ndarray:
        """Durations of the most recent callbacks [ms] (all kept, up to 65536, or the last ``recent``)."""
        return self._recent_ms(self._cb_ns, recent)

    def callback_cpu_ms(self, recent: int | None = None) -> np.ndarray:
        """CPU time the callback thread used in each of those callbacks [ms]: the work itself,
        without time spent waiting (GIL, lock) or not scheduled (another thread, the hypervisor)."""
        return self._recent_ms(self._cpu_ns, recent)

    def stats(self, recent: int | None = None) -> EngineStats:
        """Counters, latencies and callback-time percentiles (over the last ``recent`` callbacks
        if given: cheaper, for displays that refresh several times a second)."""
        t = self.callback_times_ms(recent)
        q = np.percentile(t, [50, 99, 99.9]) if t.size else np.zeros(3)
        cpu = self.callback_cpu_ms(recent)
        inl = self.stream.get_input_latency() * 1e3 if self.stream else 0.0
        outl = self.stream.get_output_latency() * 1e3 if self.stream else 0.0
        eng = self.unit.latency_samples / self.sr * 1e3
        f = self._flags
        return EngineStats(
            sr=self.sr, block_size=self.block_size, callbacks=self.callbacks, frames=self.frames,
            xruns=int(f[:4].sum()), input_underflows=int(f[0]), input_overflows=int(f[1]),
            output_underflows=int(f[2]), output_overflows=int(f[3]), faults=self.faults,
            input_latency_ms=inl, output_latency_ms=outl, engine_latency_ms=eng,
            total_latency_ms=inl + outl + eng, callback_median_ms=float(q[0]),
            callback_p99_ms=float(q[1]), callback_p999_ms=float(q[2]),
            callback_max_ms=float(t.max()) if t.size else 0.0,
            block_period_ms=self.block_size / self.sr * 1e3,
            callback_cpu_p99_ms=float(np.percentile(cpu, 99)) if cpu.size else 0.0,
            callback_cpu_max_ms=float(cpu.max()) if cpu.size else 0.0, late_callbacks=int(self._late.sum()),
            late_busy=int(self._late[0]), late_blocked=int(self._late[1]),
            late_preempted=int(self._late[2]), late_stalled=int(self._late[3]),
            steal_pct=self._steal_pct(),
        )

    def _steal_pct(self) -> float:
        now, then = cpu_ticks(), self._cpu0
        if now is None or then is None or now[0] <= then[0]:
            return 0.0
        return 100.0 * (now[1] - then[1]) / (now[0] - then[0])


def cpu_ticks() -> tuple[int, int] | None:
    """(all CPU time, time stolen by the hypervisor) of this machine so far, in clock ticks,
    from Linux's ``/proc/stat``; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user and nice]
    return (sum(v[:8]), v[7]) if len(v) >= 8 else None
