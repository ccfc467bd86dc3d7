"""MIDI input: python-rtmidi ports (named or virtual, JACK MIDI or ALSA), polled in a thread, parsed by mido.

Polling ``get_message()`` with a 4096-message queue keeps bursts that callback-mode input lost
(measured on this machine: callback mode dropped messages in bursts above ~500). Malformed
messages are counted and skipped; system-exclusive, clock and active-sensing are ignored.
"""

from __future__ import annotations

import logging
import threading
import time

from models.errors import TarabError

from . import _native_logs

log = logging.getLogger(__name__)

__all__ = ["MidiInput", "MidiError", "QUEUE_SIZE"]

QUEUE_SIZE = 32768


class MidiError(TarabError):
    """No MIDI API, or the named port does not exist."""


def _jack_running() -> bool:
    import os
    import subprocess
    import sys

    # libjack remembers a failed connection per process, so ask in a child process
    code = ("import jack, sys\ntry:\n jack.Client('tarab-probe', no_start_server=True).close()\n"
            "except Exception:\n sys.exit(1)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=10, env=dict(os.environ))
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class MidiInput:
    """An rtmidi input port polled by a thread; each parsed message goes to ``handler(msg)``.

    Parameters
    ----------
    handler : callable(mido.Message)
        Called in the polling thread.
    on_idle : callable() or None
        Called in the polling thread whenever the queue is empty (apply coalesced changes).
    port : str or None
        Connect to the first input port whose name contains this text; None with ``virtual``.
    virtual : bool
        Create a virtual input port named ``name`` that other programs connect to.
    api : {'jack', 'alsa', None}
        None: JACK MIDI when a JACK server runs, else ALSA.
    """

    def __init__(self, handler, *, port: str | None = None, virtual: bool = True, name: str = "tarab-midi-in",
                 api: str | None = None, poll_s: float = 0.001, on_idle=None):
        _native_logs.install()
        import rtmidi

        self.handler = handler
        self.on_idle = on_idle  # called when the queue is drained (coalesce controller updates)
        self.received = 0
        self.malformed = 0
        self.ignored = 0
        self.errors = 0
        self.last_error = ""
        self.poll_s = poll_s
        apis = {"jack": rtmidi.API_UNIX_JACK, "alsa": rtmidi.API_LINUX_ALSA}
        if api is None:
            api = "jack" if _jack_running() else "alsa"
        if api not in apis:
            raise MidiError(f"MIDI API {api!r} is not one of {', '.join(apis)}")
        if apis[api] not in rtmidi.get_compiled_api():
            raise MidiError(f"python-rtmidi was built without {api} support")
        self.api = api
        try:
            self._in = rtmidi.MidiIn(apis[api], name, queue_size_limit=QUEUE_SIZE)
        except Exception as e:  # rtmidi raises SystemError when the API has no server
            raise MidiError(f"cannot open the {api} MIDI API ({e})") from None
        self._in.ignore_types(sysex=True, timing=True, active_sense=True)
        if port is None and not virtual:
            raise MidiError("give a MIDI port name or use a virtual port")
        try:
            if port is not None:
                names = self._in.get_ports()
                hits = [i for i, n in enumerate(names) if port in n]
                if not hits:
                    raise MidiError(f"no MIDI input port matches {port!r}; {api} ports: {', '.join(names) or 'none'}")
                self._in.open_port(hits[0], name)
                self.port_name = names[hits[0]]
            else:
                self._in.open_virtual_port(name)
                self.port_name = name
        except MidiError:
            self._in.delete()
            raise
        except Exception as e:
            self._in.delete()
            raise MidiError(f"cannot open MIDI port ({e})") from None
        import mido

        mido.Message.from_bytes([0x90, 60, 1])  # load mido's parser now, not on the first note
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tarab-midi", daemon=True)

    def start(self) -> "MidiInput":
        self._thread.start()
        return self

    def _run(self) -> None:
        import mido

        get = self._in.get_message
        while not self._stop.is_set():
            got = get()
            if got is None:
                if self.on_idle is not None:
                    try:
                        self.on_idle()
                    except Exception as e:
                        self.errors += 1
                        self.last_error = f"{type(e).__name__}: {e}"
                time.sleep(self.poll_s)
                continue
            data, _ = got
            self.received += 1
            try:
                msg = mido.Message.from_bytes(data)
            except (ValueError, TypeError, IndexError):
                self.malformed += 1
                continue
            if msg.type in ("sysex", "clock", "active_sensing"):
                self.ignored += 1
                continue
            try:
                self.handler(msg)
            except Exception as e:  # a fault in the handler must not stop MIDI input
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.debug("MIDI handler fault", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        try:
            self._in.close_port()
        finally:
            self._in.delete()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
