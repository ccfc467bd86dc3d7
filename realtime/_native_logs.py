"""Route the C libraries' own stderr chatter (ALSA, JACK) into Python logging.

PortAudio probes every ALSA PCM and tries to reach a JACK server when it initialises; both
libraries then print to stderr through their error hooks. We install handlers on those hooks
(``snd_lib_error_set_handler``, ``jack_set_error_function``/``jack_set_info_function``) so the
messages go to the ``realtime.native`` logger at DEBUG level instead of the terminal. Real
failures still surface: PortAudio and PyAudio report them as exceptions and we raise our own
errors from those.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("realtime.native")
_keep = []  # ctypes callbacks must outlive the libraries' use of them
_installed = False


def _alsa_handler_type():
    # void (*)(const char *file, int line, const char *function, int err, const char *fmt, ...)
    return ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)


def _on_alsa(file, line, function, err, fmt):
    log.debug("alsa: %s:%s %s err=%s %s", file, line, function, err, fmt)


def _on_jack(msg):
    log.debug("jack: %s", msg.decode(errors="replace") if msg else "")


def install() -> None:
    """Install the handlers once per process (idempotent, cheap)."""
    global _installed
    if _installed:
        return
    _installed = True
    name = ctypes.util.find_library("asound")
    if name:
        try:
            lib = ctypes.CDLL(name)
            cb = _alsa_handler_type()(_on_alsa)
            lib.snd_lib_error_set_handler(cb)
            _keep.append((lib, cb))
        except (OSError, AttributeError):
            log.debug("could not hook ALSA error handler")
    for name in _jack_libraries():
        try:
            lib = ctypes.CDLL(name)
            cb = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(_on_jack)
            lib.jack_set_error_function(cb)
            lib.jack_set_info_function(cb)
            _keep.append((lib, cb))
        except (OSError, AttributeError):
            log.debug("could not hook JACK error handler of %s", name)


def _jack_libraries() -> list:
    """The system libjack and the private copy that python-rtmidi's wheel bundles."""
    import glob
    import importlib.util
    import os

    names = [n for n in [ctypes.util.find_library("jack")] if n]
    spec = importlib.util.find_spec("rtmidi")
    if spec and spec.origin:
        site = os.path.dirname(os.path.dirname(spec.origin))
        names += sorted(glob.glob(os.path.join(site, "python_rtmidi*", "libjack*.so*")))
    return names
