"""JACK tools for tests and benchmarks: a private dummy server (a real clocked device) and a probe
client (JACK-Client) that injects audio into and captures audio from the engine's ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time

import numpy as np

from models.errors import TarabError


@contextlib.contextmanager
def dummy_server(name: str | None = None, sr: int = 22050, period: int = 256, log=subprocess.DEVNULL):
    """Run ``jackd -n NAME -R -d dummy -r SR -p PERIOD``, export JACK_DEFAULT_SERVER, stop it by PID.

    Raises
    ------
    TarabError
        jackd is missing or the server does not come up within 10 s.
    """
    jackd = shutil.which("jackd")
    if jackd is None:
        raise TarabError("jackd is not installed (apt-get install jackd2)")
    name = name or f"tarab-{os.getpid()}"
    proc = subprocess.Popen([jackd, "-n", name, "-R", "-d", "dummy", "-r", str(sr), "-p", str(period)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = dict(os.environ, JACK_DEFAULT_SERVER=name)
    ok = subprocess.run(["jack_wait", "-w", "-t", "10"], env=env, capture_output=True).returncode == 0
    if not ok or proc.poll() is not None:
        proc.kill()
        proc.wait()
        raise TarabError(f"jackd dummy server {name} did not start")
    old = os.environ.get("JACK_DEFAULT_SERVER")
    os.environ["JACK_DEFAULT_SERVER"] = name
    try:
        yield name
    finally:
        if old is None:
            os.environ.pop("JACK_DEFAULT_SERVER", None)
        else:
            os.environ["JACK_DEFAULT_SERVER"] = old
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class JackProbe:
    """One JACK client with an audio output (injection) and an audio input (capture).

    In its process callback it writes ``signal`` to its output port, block by block, and
    records its input port into a preallocated buffer, starting in the same JACK cycle, so the
    offset between the two is the round-trip latency of whatever sits between them.
    """

    def __init__(self, name: str = "tarab-probe", midi: bool = False):
        import jack

        self.jack = jack
        self.client = jack.Client(name, no_start_server=True)
        self.out = self.client.outports.register("inject")
        self.inp = self.client.inports.register("capture")
        # MIDI events sent from the same process callback: their sample positions share the
        # capture's clock, so note → sound latency is measured in samples
        self.midi_out = self.client.midi_outports.register("midi") if midi else None
        self._events = []
        self._ev = 0
        self.midi_sent = 0
        self.midi_dropped = 0
        self.sr = self.client.samplerate
        self.blocksize = self.client.blocksize
        self._sig = np.zeros(0, np.float32)
        self._cap = np.zeros(0, np.float32)
        self._pos = 0
        self._armed = False
        self.done = threading.Event()
        self.xruns = 0
        self.client.set_process_callback(self._process)
        self.client.set_xrun_callback(self._xrun)
        self.client.activate()

    def _xrun(self, delay):
        # JACK reports server-wide xruns; count those that happen while we inject/record
        if self._armed:
            self.xruns += 1

    def _process(self, frames):
        out = self.out.get_array()
        if self.midi_out is not None:
            self.midi_out.clear_buffer()
        if not self._armed:
            out.fill(0.0)
            return
        p = self._pos
        if self.midi_out is not None:
            ev = self._events
            while self._ev < len(ev) and ev[self._ev][0] < p + frames:
                try:
                    self.midi_out.write_midi_event(max(0, ev[self._ev][0] - p), ev[self._ev][1])
                    self.midi_sent += 1
                except self.jack.JackError:
                    self.midi_dropped += 1
                self._ev += 1
        n = max(0, min(frames, self._sig.size - p))
        out[:n] = self._sig[p:p + n]
        out[n:] = 0.0
        m = max(0, min(frames, self._cap.size - p))
        self._cap[p:p + m] = self.inp.get_array()[:m]
        self._pos = p + frames
        if self._pos >= self._cap.size:
            self._armed = False
            self.done.set()

    def find_ports(self, client_prefix: str = "PortAudio"):
        """The (input, output) audio ports of the newest client whose name starts with the prefix."""
        ins = self.client.get_ports(client_prefix + ".*", is_audio=True, is_input=True)
        outs = self.client.get_ports(client_prefix + ".*", is_audio=True, is_output=True)
        if not ins or not outs:
            raise RuntimeError(f"no JACK audio ports of a client named {client_prefix}*")
        return ins[-1], outs[-1]

    def connect_through(self, client_prefix: str = "PortAudio") -> None:
        """Wire probe → client input and client output → probe."""
        pin, pout = self.find_ports(client_prefix)
        self.client.connect(self.out, pin)
        self.client.connect(pout, self.inp)

    def connect_midi(self, port_pattern: str) -> None:
        """Connect the probe's MIDI output to the first MIDI input port matching the pattern."""
        ports = self.client.get_ports(port_pattern, is_midi=True, is_input=True)
        if not ports:
            raise RuntimeError(f"no JACK MIDI input port matches {port_pattern!r}")
        self.client.connect(self.midi_out, ports[0])

    def play_and_record(self, signal: np.ndarray, record_samples: int, timeout: float = 60.0,
                        midi=()) -> np.ndarray:
        """Inject ``signal`` (and the MIDI events ``[(sample, bytes), ...]``) and record
        ``record_samples`` from the same cycle on; returns the capture."""
        self._events = sorted(((int(t), bytes(b)) for t, b in midi), key=lambda e: e[0])
        self._ev = 0
        self.midi_sent = self.midi_dropped = 0
        self._sig = np.ascontiguousarray(signal, np.float32)
        self._cap = np.zeros(record_samples, np.float32)
        self._pos = 0
        self.xruns = 0
        self.done.clear()
        time.sleep(0.1)  # let the graph settle after (re)connections
        self._armed = True
        if not self.done.wait(timeout):
            self._armed = False
            raise TimeoutError("JACK probe did not finish recording")
        return self._cap.copy()

    def close(self):
        self.client.deactivate()
        self.client.close()


def measure_delay(reference: np.ndarray, captured: np.ndarray) -> int:
    """Offset [samples] at which ``reference`` best matches inside ``captured`` (FFT xcorr)."""
    n = captured.size + reference.size
    nfft = 1 << int(np.ceil(np.log2(n)))
    xc = np.fft.irfft(np.fft.rfft(captured, nfft) * np.conj(np.fft.rfft(reference, nfft)), nfft)
    return int(np.argmax(xc[: captured.size]))


def wait_for(pred, timeout=10.0, interval=0.01):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(interval)
    return False
