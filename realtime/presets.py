"""TOML presets: engine and classifier settings and an FX chain of pedalboard plugins.

A preset is validated completely on load: an unknown key, a wrong type or an out-of-range value
raises :class:`PresetError` naming the file, the key and what is allowed. Shipped presets live in
the repository's ``presets/`` folder; ``load_preset`` takes a shipped name or a path.

Example (``presets/default.toml``)::

    description = "Neutral engine settings, a touch of room, a safety limiter"
    [engine]
    sr = 22050
    block_size = 256
    [classifier]
    rate_hz = 4.0
    smoothing_s = 2.0
    [[fx]]
    plugin = "Reverb"
    room_size = 0.3
    [[fx]]
    plugin = "Limiter"
    threshold_db = -1.0
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import ParameterError

__all__ = ["Preset", "PresetError", "load_preset", "shipped_presets", "PRESETS_DIR", "FX_PLUGINS", "BLOCK_INVARIANT_FX", "block_invariant"]

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# section -> key -> (type(s), lo, hi); None bounds are open
SCHEMA = {
    "engine": {"sr": (int, 8000, 192000), "block_size": (int, 32, 4096), "channels": (int, 1, 64),
               "input": ((str, int), None, None), "output": ((str, int), None, None), "host_api": (str, None, None)},
    "classifier": {"rate_hz": ((int, float), 0.01, 50.0), "smoothing_s": ((int, float), 0.0, 600.0),
                   "silence_db": ((int, float), -200.0, 0.0), "model": (str, None, None)},
    "generator": {"model": (str, None, None), "ahead_s": ((int, float), 0.05, 10.0), "iterations": (int, 0, 200),
                  "rho": ((int, float), 0.0, 0.999), "temperature": ((int, float), 0.0, 4.0),
                  "layer_db": ((int, float), -120.0, 24.0)},
    "midi": {"port": (str, None, None), "voices": (int, 1, 32), "keys": (str, None, None),
             "composers": (list, None, None), "velocity_curve": ((int, float), 0.1, 10.0),
             "min_level_db": ((int, float), -96.0, 0.0), "attack_s": ((int, float), 0.0, 5.0),
             "release_s": ((int, float), 0.0, 30.0), "mix_cc": (int, 0, 127), "temperature_cc": (int, 0, 127),
             "sustain_cc": (int, 0, 127), "temperature_min": ((int, float), 0.0, 4.0),
             "temperature_max": ((int, float), 0.0, 4.0), "bend_semitones": ((int, float), 0.0, 24.0),
             "programs": (list, None, None), "master_db": ((int, float), -60.0, 12.0)},
}
ENUMS = {("midi", "keys"): ("cyclic", "range")}
TOP_LEVEL = {"description": str, "engine": dict, "classifier": dict, "generator": dict, "midi": dict, "fx": list}
FX_PLUGINS = ("Bitcrush", "Chorus", "Clipping", "Compressor", "Delay", "Distortion", "Gain", "HighShelfFilter",
              "HighpassFilter", "LadderFilter", "Limiter", "LowShelfFilter", "LowpassFilter", "NoiseGate",
              "PeakFilter", "Phaser", "Reverb")
# Streamed with reset=False (as tarab must), pedalboard 0.9's PitchShift returns only silence
# (spotify/pedalboard#415, fix pending in #486), so presets cannot use it.
UNSTREAMABLE = {"PitchShift": "pedalboard's PitchShift outputs only silence when streamed "
                              "(spotify/pedalboard#415); use an external pitch-shift plugin (plugin = \"vst3\")"}
EXTERNAL = ("vst3", "au")
# Built-in plugins whose streaming output (reset=False) does not depend on the block size, bit for
# bit, as long as one stream uses one block length (the last block may be shorter) —
# tests/test_render.py checks each at 256 and 8192. External plugins are unknown.
BLOCK_INVARIANT_FX = FX_PLUGINS


class PresetError(ParameterError):
    """A preset file is missing, not TOML, or has an invalid key or value."""


@dataclass
class Preset:
    """A validated preset.

    Attributes
    ----------
    name : str
    path : Path
    description : str
    engine, classifier, generator, midi : dict
        Validated settings (only the keys the file gives).
    fx : list of dict
        The FX chain: ``{"plugin": name, **parameters}`` or ``{"plugin": "vst3", "path": ..., "parameters": {...}}``.
    """

    name: str
    path: Path
    description: str = ""
    engine: dict = field(default_factory=dict)
    classifier: dict = field(default_factory=dict)
    fx: list = field(default_factory=list)
    generator: dict = field(default_factory=dict)
    midi: dict = field(default_factory=dict)

    def build_fx(self):
        """A fresh ``pedalboard.Pedalboard`` for the FX chain (validated again, cheaply)."""
        import pedalboard

        return pedalboard.Pedalboard([_make_plugin(self.path, i, spec) for i, spec in enumerate(self.fx)])


def block_invariant(board) -> bool:
    """True when every plugin of ``board`` is a built-in of :data:`BLOCK_INVARIANT_FX`."""
    return all(type(p).__name__ in BLOCK_INVARIANT_FX and type(p).__module__.startswith("pedalboard") for p in board)


def _where(path, key):
    return f"{path}: {key}"


def _check_value(path, key, value, kind, lo, hi):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise PresetError(f"{_where(path, key)}: expected {names}, got {type(value).__name__} {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise PresetError(f"{_where(path, key)}: {value!r} is out of range [{lo}, {hi}]")


def _plugin_params(cls) -> list[str]:
    return sorted({k for klass in cls.__mro__ for k, v in vars(klass).items()
                   if isinstance(v, property) and not k.startswith("_") and k not in ("is_effect", "is_instrument")})


def _make_plugin(path, i, spec):
    import pedalboard

    key = f"fx[{i}]"
    name = spec.get("plugin")
    if name in EXTERNAL:
        p = spec.get("path")
        if not isinstance(p, str):
            raise PresetError(f"{_where(path, key)}.path: an external {name} plugin needs path = \"...\"")
        extra = sorted(set(spec) - {"plugin", "path", "parameters"})
        if extra:
            raise PresetError(f"{_where(path, key)}: unknown key(s) {extra}; allowed: plugin, path, parameters")
        params = spec.get("parameters", {})
        if not isinstance(params, dict):
            raise PresetError(f"{_where(path, key)}.parameters: expected a table")
        try:
            plugin = pedalboard.load_plugin(p)
        except Exception as e:  # pedalboard raises ImportError/RuntimeError/ValueError for bad plugins
            raise PresetError(f"{_where(path, key)}.path: cannot load plugin {p!r} ({str(e).splitlines()[0]})") from None
        for k, v in params.items():
            try:
                setattr(plugin, k, v)
            except Exception as e:
                raise PresetError(f"{_where(path, key)}.parameters.{k}: {e}") from None
        return plugin
    if name in UNSTREAMABLE:
        raise PresetError(f"{_where(path, key)}.plugin: {name!r} cannot be used: {UNSTREAMABLE[name]}")
    if name not in FX_PLUGINS:
        raise PresetError(f"{_where(path, key)}.plugin: {name!r} is not one of {', '.join(FX_PLUGINS + EXTERNAL)}")
    cls = getattr(pedalboard, name)
    allowed = _plugin_params(cls)
    plugin = cls()
    for k, v in spec.items():
        if k == "plugin":
            continue
        if k not in allowed:
            raise PresetError(f"{_where(path, key)}.{k}: not a parameter of {name}; allowed: {', '.join(allowed)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PresetError(f"{_where(path, key)}.{k}: expected a number, got {type(v).__name__} {v!r}")
        try:
            setattr(plugin, k, v)
        except (ValueError, TypeError) as e:
            raise PresetError(f"{_where(path, key)}.{k}: {e}") from None
    return plugin


def shipped_presets() -> list[Path]:
    return sorted(PRESETS_DIR.glob("*.toml"))


def load_preset(name_or_path) -> Preset:
    """Load and validate a preset by shipped name (``"default"``) or file path.

    Raises
    ------
    PresetError
        Missing file, TOML syntax error, unknown key, wrong type, out-of-range value, unknown or
        unloadable plugin — naming the file and the key.
    """
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = PRESETS_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        names = ", ".join(x.stem for x in shipped_presets()) or "none"
        raise PresetError(f"{name_or_path}: no such preset file (shipped presets: {names})")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PresetError(f"{p}: not valid TOML ({e})") from None
    for k, v in data.items():
        if k not in TOP_LEVEL:
            raise PresetError(f"{p}: unknown key {k!r}; allowed: {', '.join(TOP_LEVEL)}")
        if not isinstance(v, TOP_LEVEL[k]):
            raise PresetError(f"{p}: {k}: expected {TOP_LEVEL[k].__name__}, got {type(v).__name__}")
    for section, keys in SCHEMA.items():
        for k, v in data.get(section, {}).items():
            if k not in keys:
                raise PresetError(f"{p}: [{section}] {k}: unknown key; allowed: {', '.join(keys)}")
            _check_value(p, f"[{section}] {k}", v, *keys[k])
            allowed = ENUMS.get((section, k))
            if allowed and v not in allowed:
                raise PresetError(f"{p}: [{section}] {k}: {v!r} is not one of {', '.join(allowed)}")
    midi = data.get("midi", {})
    for k in ("composers", "programs"):
        if k in midi and (not midi[k] or not all(isinstance(x, str) for x in midi[k])):
            raise PresetError(f"{p}: [midi] {k}: expected a non-empty list of names")
    if midi.get("temperature_min", 0.0) > midi.get("temperature_max", 4.0):
        raise PresetError(f"{p}: [midi] temperature_min must not exceed temperature_max")
    fx = data.get("fx", [])
    for i, spec in enumerate(fx):
        if not isinstance(spec, dict) or "plugin" not in spec:
            raise PresetError(f"{p}: fx[{i}]: each [[fx]] entry needs plugin = \"Name\"")
    preset = Preset(name=p.stem, path=p, description=data.get("description", ""),
                    engine=dict(data.get("engine", {})), classifier=dict(data.get("classifier", {})), fx=list(fx),
                    generator=dict(data.get("generator", {})), midi=dict(midi))
    preset.build_fx()  # validates every plugin and parameter now, not mid-stream
    return preset
