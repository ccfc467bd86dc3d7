"""`tarab demo` on what ships in the repo, and the top-level CLI behaviour."""

import json

from conftest import REPO, run_cli


def test_demo_writes_outputs(tmp_path):
    import soundfile as sf

    out = tmp_path / "out"
    r = run_cli("demo", "-o", out)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    tl = json.loads((out / "rendered.timeline.json").read_text())
    assert s["windows"] == len(tl["timeline"]) > 40
    assert s["composer"] == s["top"][0]["composer"] and s["composer"] in r.stdout
    assert s["morph"]["from"] == s["top"][0]["composer"] and s["morph"]["to"] == s["top"][1]["composer"]
    for png in ("rendered.timeline.png", "spectrograms.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    clip = sf.info(REPO / "realtime" / "clips" / "demo.ogg")
    ren, gen = sf.info(out / "rendered.wav"), sf.info(out / "generated.wav")
    assert (ren.samplerate, ren.frames) == (clip.samplerate, clip.frames)
    assert gen.samplerate == 22050 and gen.frames == 10 * 22050
    y, _ = sf.read(out / "generated.wav")
    assert 0.01 < abs(y).max() < 1.0
    assert sorted(p.name for p in out.iterdir()) == sorted(s["outputs"])  # no temp files left


def test_help_and_unknown_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("devices", "monitor", "live", "classify", "train", "demo", "generate", "render", "play",
                "train-generator", "evaluate-generation"):
        assert cmd in r.stdout
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
