"""The MIDI map and voice logic of `tarab play` (no audio device needed)."""

import mido
import numpy as np
import pytest

from realtime.generate import load_generator
from realtime.play import MidiMap, build_player
from realtime.presets import PresetError, load_preset


@pytest.fixture(scope="module")
def player(tiny_models):
    _, _, gen = tiny_models
    inst, chain = build_player(load_preset("default"), load_generator(gen), sr=22050, block_size=256)
    return inst, chain


def test_every_note_sounds_and_maps_onto_composers():
    m = MidiMap(composers=["a", "b", "c"])
    assert {m.composer_for(n) for n in range(128)} == {"a", "b", "c"}
    assert [m.composer_for(n) for n in (60, 61, 62, 63)] == ["a", "b", "c", "a"]
    r = MidiMap(composers=["a", "b", "c"], keys="range")
    assert r.composer_for(0) == "a" and r.composer_for(64) == "b" and r.composer_for(127) == "c"
    assert m.second_for("c") == "a"
    assert m.level_for(127) == 1.0 and m.level_for(64) == pytest.approx((64 / 127) ** 1.5)
    assert m.level_for(1) == pytest.approx(10 ** (-40 / 20))  # the floor


def test_voices_sustain_bend_program_and_stealing(player):
    inst, chain = player
    h = inst.handle
    for note in range(60, 60 + len(inst.voices) + 2):  # more notes than voices: the oldest is stolen
        h(mido.Message("note_on", note=note, velocity=100))
    assert sorted(v.note for v in inst.voices) == list(range(62, 62 + len(inst.voices)))
    assert all(v.state == "on" for v in inst.voices)
    h(mido.Message("control_change", control=64, value=127))  # sustain down
    h(mido.Message("note_off", note=62))
    v62 = next(v for v in inst.voices if v.note == 62)
    assert v62.state == "held" and v62.target > 0
    h(mido.Message("control_change", control=64, value=0))  # sustain up: held notes release
    assert v62.target == 0.0 and v62.rate_down > 0
    h(mido.Message("pitchwheel", pitch=8191))
    h(mido.Message("control_change", control=1, value=64))
    h(mido.Message("control_change", control=74, value=127))
    inst.apply()
    assert inst.transpose == pytest.approx(2.0, abs=1e-3) and inst.mix == pytest.approx(64 / 127)
    assert inst.temperature == pytest.approx(inst.map.temperature_max)
    t = inst.voices[0].gen._target
    assert t[1] == inst.map.second_for(t[0]) and t[2] == pytest.approx(64 / 127) and t[4] == pytest.approx(2.0, abs=1e-3)
    fx = chain.units[1]
    h(mido.Message("program_change", program=2))
    assert inst.program == 2 and fx.board is inst.boards[2]
    h(mido.Message("program_change", program=5))  # wraps around the 4 programs
    assert inst.program == 1 and fx.board is inst.boards[1]


def test_mixer_ramps_and_never_clips(player):
    inst, _ = player
    mixer = inst.mixer
    for v in inst.voices:  # every voice at full level on a loud fake source
        v.gen.render = lambda n: np.ones(n, np.float32)
        v.target, v.gain, v.rate_up = 1.0, 0.0, 1.0 / 256
    y = mixer.render(256).copy()
    assert y[0] < y[-1] and np.all(np.diff(y) >= 0)  # a ramp, not a jump
    y = mixer.render(256)
    assert np.abs(y).max() < 1.0  # 6 voices at full scale, soft-clipped below 1


def test_midi_preset_validation(tmp_path):
    bad = tmp_path / "m.toml"
    for text, msg in (('[midi]\nkeys = "diagonal"\n', "keys"), ('[midi]\nvoices = 99\n', "voices"),
                      ('[midi]\nprograms = []\n', "programs"), ('[midi]\nrelease_s = "long"\n', "release_s"),
                      ('[midi]\ntemperature_min = 2.0\ntemperature_max = 1.0\n', "temperature_min"),
                      ('[generator]\nahead_s = 0.0\n', "ahead_s")):
        bad.write_text(text)
        with pytest.raises(PresetError, match=msg):
            load_preset(bad)
