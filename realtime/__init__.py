"""tarab's real-time engine: block units, streaming DSP kernels, the audio engine and the CLI.

The public names are re-exported here; heavy optional dependencies (torch, PyAudio, rtmidi,
pedalboard) are imported inside the functions that use them.
"""

from models.errors import BundleError, DataError, ParameterError, TarabError

from .devices import AudioDevices, DeviceError, list_midi_ports
from .engine import AudioEngine, EngineStats
from .ring import Ring
from .units import Chain, LevelMeter, PassThrough, Recorder, Unit

__all__ = [
    "AudioDevices", "AudioEngine", "BundleError", "Chain", "DataError", "DeviceError", "EngineStats",
    "LevelMeter", "ParameterError", "PassThrough", "Recorder", "Ring", "TarabError", "Unit", "list_midi_ports",
]
