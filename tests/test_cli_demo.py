"""`tarab demo` on what ships in the repo, and the top-level CLI behaviour."""

import json

from conftest import run_cli


def test_demo_writes_outputs(tmp_path):
    r = run_cli("demo", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["windows"] == len(s["timeline"]) > 40
    assert s["composer"] == s["top"][0]["composer"] and s["composer"] in r.stdout
    assert (tmp_path / "out" / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_help_and_unknown_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("devices", "monitor", "live", "classify", "train", "demo"):
        assert cmd in r.stdout
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
