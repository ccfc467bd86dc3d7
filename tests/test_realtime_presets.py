"""Presets: shipped ones validate and build pedalboard chains; every kind of bad preset is refused
with the file and the key named."""

import json

import numpy as np
import pedalboard
import pytest

from conftest import run_cli
from realtime.presets import PresetError, load_preset, shipped_presets


def test_shipped_presets_load_and_process():
    names = [p.stem for p in shipped_presets()]
    assert {"default", "concert-hall", "studio-dry", "tape-echo"} <= set(names)
    x = (0.3 * np.random.default_rng(0).standard_normal((1, 22050))).astype(np.float32)
    for n in names:
        pr = load_preset(n)
        assert pr.description
        y = pr.build_fx()(x, 22050)
        assert y.shape == x.shape and np.isfinite(y).all()


def test_fx_chain_equals_pedalboard_reference():
    pr = load_preset("default")
    ref = pedalboard.Pedalboard([pedalboard.Reverb(room_size=0.3, wet_level=0.15, dry_level=0.85),
                                 pedalboard.Limiter(threshold_db=-1.0, release_ms=100.0)])
    x = (0.5 * np.sin(np.linspace(0, 2000, 44100))).astype(np.float32)[None]
    np.testing.assert_array_equal(pr.build_fx()(x, 22050), ref(x, 22050))
    assert pr.engine == {"sr": 22050, "block_size": 256, "channels": 1}


@pytest.mark.parametrize("text,match", [
    ('colour = "red"', "unknown key 'colour'"),
    ('[engine]\nblock_size = 5000', r"\[engine\] block_size: 5000 is out of range \[32, 4096\]"),
    ('[engine]\nblock_size = "big"', r"\[engine\] block_size: expected int, got str"),
    ('[classifier]\nrate = 4', r"\[classifier\] rate: unknown key; allowed: rate_hz"),
    ('[[fx]]\nplugin = "Reverbb"', r"fx\[0\].plugin: 'Reverbb' is not one of"),
    ('[[fx]]\nplugin = "Reverb"\nroomsize = 0.5', r"fx\[0\].roomsize: not a parameter of Reverb; allowed: damping"),
    ('[[fx]]\nplugin = "Reverb"\nroom_size = 5.0', r"fx\[0\].room_size: Room Size value must be between 0.0 and 1.0"),
    ('[[fx]]\nplugin = "Compressor"\nratio = "high"', r"fx\[0\].ratio: expected a number"),
    ('[[fx]]\nroom_size = 0.5', r"fx\[0\]: each \[\[fx\]\] entry needs plugin"),
    ('[[fx]]\nplugin = "vst3"\npath = "/nonexistent/Plugin.vst3"', r"fx\[0\].path: cannot load plugin"),
    ('[engine\nsr = 1', "not valid TOML"),
])
def test_bad_presets_name_file_and_key(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(PresetError, match=match) as e:
        load_preset(f)
    assert str(f) in str(e.value)


def test_missing_preset_lists_shipped():
    with pytest.raises(PresetError, match="shipped presets: .*default"):
        load_preset("no-such-preset")


def test_cli_presets():
    r = run_cli("presets", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {"default", "tape-echo"} <= {x["name"] for x in rows}
    assert all(x["description"] for x in rows)
    r = run_cli("presets")
    assert r.returncode == 0 and "concert-hall" in r.stdout
