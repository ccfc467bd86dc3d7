"""``tarab play``: MIDI-controlled live generation.

- :class:`MidiMap` — the mapping from a preset's ``[midi]`` table (every number changeable).
- :class:`Voice` — one :class:`~realtime.generate.Generator` (decoding ahead in its own worker)
  plus the gains the audio callback ramps.
- :class:`Instrument` — the MIDI side: note-on picks a voice and triggers it, note-off releases
  it (or holds it under the sustain pedal), controllers change the targets of every voice.
- :class:`PlayUnit` — the audio side (the engine's callback): reads each sounding voice's ring,
  ramps its gain toward its target (attack/release), mixes, applies the master gain and a soft
  clipper (so several voices never clip), then the program's FX board.

Gains take effect at the next block with per-sample ramps; composer, mix, temperature and
transposition take effect at each voice's next decoded window (windows crossfade, so the style
moves smoothly).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from models.errors import ParameterError

from .units import SoftClip, _soft_clip


log = logging.getLogger(__name__)

__all__ = ["MidiMap", "Voice", "Instrument", "VoiceMixer", "build_player"]

MASTER_KNEE = 0.75  # the voices' master saturation starts here


# The callback's kernels keep the GIL: they take microseconds, and releasing it would let a worker
# take it for up to a switch interval before the callback could continue.
@njit(cache=True, fastmath=True)
def _mix_ramp(acc, x, g0, g1, n):
    """acc[:n] += x[:n] * (linear ramp from g0 to g1)."""
    step = (g1 - g0) / n
    g = g0
    for i in range(n):
        g += step
        acc[i] += x[i] * g


@dataclass
class MidiMap:
    """How MIDI drives the voices (the ``[midi]`` table of a preset; defaults below)."""

    composers: list
    voices: int = 6
    keys: str = "cyclic"
    velocity_curve: float = 1.5
    min_level_db: float = -40.0
    attack_s: float = 0.01
    release_s: float = 0.8
    mix_cc: int = 1
    temperature_cc: int = 74
    sustain_cc: int = 64
    temperature_min: float = 0.3
    temperature_max: float = 1.6
    bend_semitones: float = 2.0
    master_db: float = -3.0
    programs: list = field(default_factory=list)
    port: str | None = None

    @classmethod
    def from_preset(cls, preset, labels) -> "MidiMap":
        m = dict(preset.midi)
        composers = m.pop("composers", None) or list(labels)
        unknown = [c for c in composers if c not in labels]
        if unknown:
            raise ParameterError(f"{preset.path}: [midi] composers: unknown {unknown}; the generator knows "
                                 f"{', '.join(labels)}")
        return cls(composers=composers, **m)

    def composer_for(self, note: int) -> str:
        n = len(self.composers)
        i = note % n if self.keys == "cyclic" else min(n - 1, note * n // 128)
        return self.composers[i]

    def second_for(self, composer: str) -> str:
        """The composer the mod wheel mixes toward: the next one in the list."""
        return self.composers[(self.composers.index(composer) + 1) % len(self.composers)]

    def level_for(self, velocity: int) -> float:
        floor = 10.0 ** (self.min_level_db / 20.0)
        return max(floor, (max(1, min(127, velocity)) / 127.0) ** self.velocity_curve)


class Voice:
    """A generator plus the state the MIDI thread writes and the audio thread reads."""

    def __init__(self, gen):
        self.gen = gen
        self.note = -1
        self.composer = ""
        self.target = 0.0  # gain the callback ramps toward (MIDI thread writes)
        self.gain = 0.0  # current gain (audio thread owns)
        self.rate_up = 1.0  # max gain change per sample
        self.rate_down = 1.0
        self.held = False  # released under the sustain pedal
        self.on_time = 0.0
        self.gain_reset = False  # set by note-on: the callback restarts the gain from 0
        self.seed = 0

    @property
    def state(self) -> str:
        if self.target > 0:
            return "held" if self.held else "on"
        return "release" if self.gain > 0 else "free"


class Instrument:
    """MIDI → voices. ``handle(msg)`` runs in the MIDI thread (one at a time)."""

    def __init__(self, voices: list, midi_map: MidiMap, sr: int, boards=None, temperature: float = 1.0):
        self.voices = voices
        self.map = midi_map
        self.sr = sr
        self.mix = 0.0
        self.temperature = temperature
        self.transpose = 0.0
        self.sustain = False
        self.program = 0
        self.boards = boards or []
        self.fx_unit = None
        self.counts = {"note_on": 0, "note_off": 0, "control_change": 0, "pitchwheel": 0, "program_change": 0,
                       "other": 0}
        self.last_cc = {}
        self._seed = 0
        self._dirty = False
        self._lock = threading.Lock()  # MIDI thread vs. the display (never the audio thread)

    # ---- helpers -----------------------------------------------------------------------------
    def _retarget(self, v: Voice) -> None:
        second = self.map.second_for(v.composer)
        v.gen.set_target(v.composer, second, self.mix, self.temperature, self.transpose)

    def _pick_voice(self) -> Voice:
        free = [v for v in self.voices if v.state == "free"]
        if free:
            return free[0]
        releasing = [v for v in self.voices if v.state == "release"]
        if releasing:
            return min(releasing, key=lambda v: v.gain)
        return min(self.voices, key=lambda v: v.on_time)  # steal the oldest

    def _release(self, v: Voice) -> None:
        v.held = False
        v.rate_down = max(v.gain, v.target, 1e-6) / max(1.0, self.map.release_s * self.sr)
        v.target = 0.0

    # ---- MIDI ------------------------------------------------------------------------------
    def handle(self, msg) -> None:
        kind = msg.type
        with self._lock:
            if kind == "note_on" and msg.velocity > 0:
                self.counts["note_on"] += 1
                v = self._pick_voice()
                v.note = msg.note
                v.composer = self.map.composer_for(msg.note)
                v.held = False
                self._retarget(v)
                self._seed += 1
                v.seed = msg.note * 100003 + self._seed  # a new phrase each time a key is struck
                v.gen.trigger(seed=v.seed)
                level = self.map.level_for(msg.velocity)
                v.rate_up = level / max(1.0, self.map.attack_s * self.sr)
                v.gain_reset = True  # a fresh phrase starts from silence
                v.on_time = time.monotonic()
                v.target = level
            elif kind in ("note_off", "note_on"):
                self.counts["note_off"] += 1
                for v in self.voices:
                    if v.note == msg.note and v.target > 0 and not v.held:
                        if self.sustain:
                            v.held = True
                        else:
                            self._release(v)
            elif kind == "control_change":
                self.counts["control_change"] += 1
                self.last_cc[msg.control] = msg.value
                if msg.control == self.map.mix_cc:
                    self.mix = msg.value / 127.0
                    self._dirty = True
                elif msg.control == self.map.temperature_cc:
                    m = self.map
                    self.temperature = m.temperature_min + (m.temperature_max - m.temperature_min) * msg.value / 127.0
                    self._dirty = True
                elif msg.control == self.map.sustain_cc:
                    self.sustain = msg.value >= 64
                    if not self.sustain:
                        for v in self.voices:
                            if v.held:
                                self._release(v)
            elif kind == "pitchwheel":
                self.counts["pitchwheel"] += 1
                self.transpose = msg.pitch / 8192.0 * self.map.bend_semitones
                self._dirty = True
            elif kind == "program_change":
                self.counts["program_change"] += 1
                if self.boards and self.fx_unit is not None:
                    self.program = msg.program % len(self.boards)
                    self.fx_unit.switch(self.boards[self.program])
            else:
                self.counts["other"] += 1

    def start(self) -> "Instrument":
        for v in self.voices:
            v.gen.start()
        return self

    def stop(self) -> None:
        for v in self.voices:
            v.gen.stop()

    def apply(self) -> None:
        """Send coalesced controller changes to the voices (the MIDI thread calls this when its
        queue is empty, so a burst of controller messages costs one update)."""
        if not self._dirty:
            return
        with self._lock:
            self._dirty = False
            for v in self.voices:
                if v.composer:
                    self._retarget(v)

    def snapshot(self) -> dict:
        with self._lock:
            return {"voices": [{"note": v.note, "composer": v.composer, "state": v.state,
                                "level_db": round(20 * np.log10(max(v.gain, 1e-6)), 1)} for v in self.voices],
                    "mix": round(self.mix, 3), "temperature": round(self.temperature, 3),
                    "transpose": round(self.transpose, 3), "sustain": self.sustain, "program": self.program,
                    "midi": dict(self.counts)}


class VoiceMixer:
    """The audio side: voices → ramped gains → mix → master gain + soft clip, at the generator's rate.

    A source for :class:`~realtime.render.LayerUnit` (``replace=True``), which resamples to the
    device rate when it differs and runs in the engine's callback: ``render`` only reads the
    voices' rings, ramps and mixes into a preallocated buffer.
    """

    def __init__(self, voices: list, sr: int, master_db: float = -3.0, max_block: int = 16384):
        self.voices = voices
        self.sr = sr
        self.master = float(10.0 ** (master_db / 20.0))
        self._acc = np.zeros(max_block, np.float32)
        self.samples = 0
        _mix_ramp(self._acc, self._acc, 0.0, 1.0, 16)  # compile (or load cached) kernels now
        _soft_clip(self._acc, 16, 1.0, MASTER_KNEE)

    def render(self, n: int) -> np.ndarray:
        acc = self._acc[:n]
        acc[:] = 0.0
        for v in self.voices:
            target = v.target
            if v.gain_reset:
                v.gain_reset = False
                v.gain = 0.0
            if target <= 0.0 and v.gain <= 0.0:
                continue
            g0 = v.gain
            if target > g0:
                g1 = min(target, g0 + v.rate_up * n)
            else:
                g1 = max(target, g0 - v.rate_down * n)
            _mix_ramp(acc, v.gen.render(n), g0, g1, n)
            v.gain = g1 if g1 > 1e-5 or target > 0 else 0.0
        _soft_clip(acc, n, self.master, MASTER_KNEE)
        self.samples += n
        return acc


def build_player(preset, generator_bundle, *, sr: int, block_size: int, channels: int = 1):
    """Voices, instrument and the engine's unit chain for ``tarab play``.

    Returns ``(instrument, chain)``; the voices' workers are started by ``instrument.start()``.
    """
    from .generate import DecodeGate, Generator
    from .presets import load_preset
    from .render import FxUnit, LayerUnit
    from .units import Chain

    g = preset.generator
    labels = list(generator_bundle.card.labels)
    mm = MidiMap.from_preset(preset, labels)
    gate = DecodeGate()  # one voice decodes at a time, a note just struck first
    voices = [Voice(Generator(generator_bundle, ahead_s=g.get("ahead_s", 0.3), n_iter=g.get("iterations", 12),
                              gate=gate)) for _ in range(mm.voices)]
    boards = [load_preset(name).build_fx() for name in mm.programs] if mm.programs else []
    board = boards[0] if boards else preset.build_fx()
    inst = Instrument(voices, mm, generator_bundle.card.sr, boards=boards, temperature=g.get("temperature", 1.0))
    mixer = VoiceMixer(voices, generator_bundle.card.sr, mm.master_db)
    fx = FxUnit(board)
    inst.fx_unit = fx
    inst.mixer = mixer
    chain = Chain([LayerUnit(mixer, 0.0, replace=True), fx, SoftClip()])  # as the render chain ends
    return inst, chain
