"""Audio and MIDI device discovery and selection (PyAudio / PortAudio, python-rtmidi)."""

from __future__ import annotations

import contextlib
import logging

from models.errors import ParameterError, TarabError

from . import _native_logs

log = logging.getLogger(__name__)

__all__ = ["AudioDevices", "DeviceError", "list_midi_ports", "JACK_HOST_API"]

JACK_HOST_API = "JACK Audio Connection Kit"
PROBE_RATES = (22050, 32000, 44100, 48000, 88200, 96000)


class DeviceError(TarabError):
    """No usable audio/MIDI device, or the audio server is gone."""


class AudioDevices(contextlib.AbstractContextManager):
    """A PortAudio session: lists host APIs/devices and resolves user device choices.

    Parameters
    ----------
    host_api : str or None
        Host API name (substring, case-insensitive) to restrict choices to, e.g. ``"jack"``.
        None prefers JACK when a JACK server runs, otherwise PortAudio's default host API.
    """

    def __init__(self, host_api: str | None = None):
        _native_logs.install()
        import pyaudio

        self.pyaudio = pyaudio
        self.pa = pyaudio.PyAudio()
        try:
            self.host_api_index = self._resolve_host_api(host_api)
        except BaseException:
            self.close()
            raise

    # ---- listing ------------------------------------------------------------------------
    def host_apis(self) -> list[dict]:
        return [self.pa.get_host_api_info_by_index(i) for i in range(self.pa.get_host_api_count())]

    def devices(self) -> list[dict]:
        out = []
        apis = {a["index"]: a["name"] for a in self.host_apis()}
        for i in range(self.pa.get_device_count()):
            d = dict(self.pa.get_device_info_by_index(i))
            d["hostApiName"] = apis.get(d["hostApi"], "?")
            out.append(d)
        return out

    def supported_rates(self, device: dict) -> list[int]:
        """Sample rates from a standard list that the device opens at (float32, 1 channel)."""
        rates = []
        for r in PROBE_RATES:
            kw = {}
            if device["maxInputChannels"] > 0:
                kw.update(input_device=device["index"], input_channels=1, input_format=self.pyaudio.paFloat32)
            if device["maxOutputChannels"] > 0:
                kw.update(output_device=device["index"], output_channels=1, output_format=self.pyaudio.paFloat32)
            try:
                if kw and self.pa.is_format_supported(r, **kw):
                    rates.append(r)
            except ValueError:
                pass
        return rates

    # ---- choosing -----------------------------------------------------------------------
    def _resolve_host_api(self, name):
        apis = self.host_apis()
        if name is None:
            jack = [a for a in apis if a["name"] == JACK_HOST_API and a["deviceCount"] > 0]
            if jack:
                return jack[0]["index"]
            return None
        hits = [a for a in apis if name.lower() in a["name"].lower()]
        if len(hits) != 1:
            names = ", ".join(repr(a["name"]) for a in apis) or "none"
            what = "matches none" if not hits else "is ambiguous"
            hint = " (is a JACK server running?)" if not hits and name.lower() in JACK_HOST_API.lower() else ""
            raise ParameterError(f"host API {name!r} {what}{hint}; available: {names}")
        if hits[0]["deviceCount"] == 0:
            extra = " (is the JACK server running?)" if hits[0]["name"] == JACK_HOST_API else ""
            raise DeviceError(f"host API {hits[0]['name']!r} has no devices{extra}")
        return hits[0]["index"]

    def resolve(self, spec, kind: str) -> dict:
        """Pick the input or output device named by ``spec``.

        Parameters
        ----------
        spec : None, int, or str
            None: the default device (of the chosen host API). An int or a string of digits:
            a device index. Other strings: a case-insensitive substring of the device name.
        kind : {'input', 'output'}

        Raises
        ------
        ParameterError
            Unknown index or name, ambiguous name, or a device without channels of that kind.
        DeviceError
            No device of that kind exists at all.
        """
        key = "maxInputChannels" if kind == "input" else "maxOutputChannels"
        devs = [d for d in self.devices() if d[key] > 0
                and (self.host_api_index is None or d["hostApi"] == self.host_api_index)]
        listing = "; ".join(f"{d['index']}: {d['name']} [{d['hostApiName']}]" for d in devs) or "none"
        if not devs:
            raise DeviceError(f"no audio {kind} device found (is an audio server running? see `tarab devices`)")
        if spec is None:
            if self.host_api_index is not None:
                api = self.pa.get_host_api_info_by_index(self.host_api_index)
                idx = api["defaultInputDevice" if kind == "input" else "defaultOutputDevice"]
            else:
                try:
                    info = (self.pa.get_default_input_device_info() if kind == "input"
                            else self.pa.get_default_output_device_info())
                    idx = info["index"]
                except (IOError, OSError):
                    idx = -1
            match = [d for d in devs if d["index"] == idx] or devs[:1]
            return match[0]
        if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
            i = int(spec)
            match = [d for d in devs if d["index"] == i]
            if not match:
                raise ParameterError(f"{kind} device {i} does not exist or has no {kind} channels; available: {listing}")
            return match[0]
        s = str(spec).lower()
        exact = [d for d in devs if d["name"].lower() == s]
        match = exact or [d for d in devs if s in d["name"].lower()]
        if len(match) != 1:
            what = "matches no" if not match else "matches more than one"
            raise ParameterError(f"{kind} device {spec!r} {what} device; available: {listing}")
        return match[0]

    def check_format(self, sr: int, in_dev: dict | None, in_ch: int, out_dev: dict | None, out_ch: int) -> None:
        """Raise :class:`ParameterError` unless the devices open at ``sr`` with those channels."""
        for dev, ch, kind in ((in_dev, in_ch, "input"), (out_dev, out_ch, "output")):
            if dev is None:
                continue
            cap = dev["maxInputChannels" if kind == "input" else "maxOutputChannels"]
            if ch > cap:
                raise ParameterError(f"{kind} channels: {ch} requested, device {dev['name']!r} has {cap}")
        kw = {}
        if in_dev is not None:
            kw.update(input_device=in_dev["index"], input_channels=in_ch, input_format=self.pyaudio.paFloat32)
        if out_dev is not None:
            kw.update(output_device=out_dev["index"], output_channels=out_ch, output_format=self.pyaudio.paFloat32)
        try:
            self.pa.is_format_supported(sr, **kw)
        except ValueError as e:
            dev = in_dev or out_dev
            rates = self.supported_rates(dev)
            raise ParameterError(f"sr: device {dev['name']!r} cannot open at {sr} Hz ({e.args[0] if e.args else e}); "
                                 f"rates it opens at: {rates or 'none of ' + str(PROBE_RATES)}") from None

    def close(self) -> None:
        if self.pa is not None:
            self.pa.terminate()
            self.pa = None

    def __exit__(self, *exc):
        self.close()


def list_midi_ports() -> list[dict]:
    """MIDI input and output ports of every API python-rtmidi was built with.

    Returns
    -------
    list of dict
        One entry per API and direction: ``{"api": name, "direction": "in"|"out", "ports": [names]}``,
        or ``{"api": name, "direction": ..., "error": message}`` where the API is unavailable
        (e.g. no ALSA sequencer, no JACK server).
    """
    _native_logs.install()
    import rtmidi

    out = []
    for api in rtmidi.get_compiled_api():
        if api == rtmidi.API_RTMIDI_DUMMY:
            continue
        api_name = rtmidi.get_api_display_name(api)
        for direction, cls in (("in", rtmidi.MidiIn), ("out", rtmidi.MidiOut)):
            try:
                m = cls(api)
            except Exception as e:  # rtmidi raises its own SystemError when the API has no server
                out.append({"api": api_name, "direction": direction, "error": str(e)})
                continue
            try:
                out.append({"api": api_name, "direction": direction, "ports": list(m.get_ports())})
            finally:
                m.delete()
    return out
