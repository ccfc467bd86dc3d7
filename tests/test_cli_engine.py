"""The CLI around the engine, run as a user would: subprocesses against the JACK dummy server."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, repeat_on_graph_xrun, run_cli, tarab_on_time

pytestmark = pytest.mark.jack


def _popen(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "realtime.cli", *args], cwd=REPO, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _no_traceback(err: str):
    assert "Traceback" not in err, err


def test_devices_lists_jack_device_and_midi_apis(jack_server):
    r = run_cli("devices", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    jack = [x for x in d["devices"] if x["host_api"] == "JACK Audio Connection Kit"]
    assert jack and jack[0]["inputs"] >= 1 and jack[0]["outputs"] >= 1 and 22050 in jack[0]["rates"]
    apis = {p["api"] for p in d["midi"]}
    assert "Jack" in apis
    assert not [p for p in d["midi"] if p["api"] == "Jack" and "error" in p]
    r = run_cli("devices")
    assert r.returncode == 0 and "JACK Audio Connection Kit" in r.stdout and "MIDI ports" in r.stdout
    _no_traceback(r.stderr)
    assert "ALSA lib" not in r.stderr and "Cannot connect" not in r.stderr  # native noise silenced


def test_devices_shows_jack_midi_ports(jack_server):
    import rtmidi

    port = rtmidi.MidiOut(rtmidi.API_UNIX_JACK)
    port.open_virtual_port("tarab-test-keys")
    try:
        r = run_cli("devices", "--json")
        names = [n for p in json.loads(r.stdout)["midi"] if p["api"] == "Jack" for n in p["ports"]]
        assert any("tarab-test-keys" in n for n in names), names
    finally:
        port.close_port()
        port.delete()


def test_monitor_runs_and_reports(jack_server):
    def once():
        r = run_cli("monitor", "--seconds", "1.5", "--json")
        assert r.returncode == 0, r.stderr
        return [json.loads(x) for x in r.stdout.splitlines()]

    lines = repeat_on_graph_xrun(once, lambda lines: lines[-1])  # rerun after a graph xrun (conftest)
    end = lines[-1]
    assert end["event"] == "end" and end["reason"] == "duration"
    assert tarab_on_time(end) and end["faults"] == 0 and end["callbacks"] > 100, end
    assert end["total_latency_ms"] > 0 and end["block_period_ms"] == pytest.approx(256 / 22050 * 1e3)
    assert any(x["event"] == "level" for x in lines)


@pytest.mark.parametrize("args,match", [
    (["--input", "no-such-card"], "matches no device"),
    (["--input", "42"], "does not exist"),
    (["--sr", "44100"], "cannot open at 44100 Hz"),
    (["--channels", "9"], "channels"),
    (["--block", "8"], "block_size"),
    (["--host-api", "coreaudio"], "host API"),
])
def test_monitor_bad_input_one_line(jack_server, args, match):
    r = run_cli("monitor", "--seconds", "1", *args)
    assert r.returncode == 2
    _no_traceback(r.stderr)
    assert match in r.stderr and r.stderr.count("\n") == 1 and r.stderr.startswith("tarab: error:")


def test_no_audio_server():
    r = run_cli("monitor", "--seconds", "1", "--host-api", "jack", env={"JACK_DEFAULT_SERVER": "tarab-nobody"})
    assert r.returncode == 2 and "JACK server" in r.stderr
    _no_traceback(r.stderr)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signals_stop_cleanly(jack_server, sig, code, word):
    p = _popen("monitor", "--json")
    try:
        first = p.stdout.readline()  # the engine is running once it prints
        assert json.loads(first)["event"] == "level"
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == code, err
    assert word in err and err.strip().count("\n") == 0
    _no_traceback(err)


def test_server_disappearing_stops_engine():
    """Stop the (private) JACK server under a running monitor: clear message, exit 3.

    SIGTERM, not SIGKILL: a killed jackd leaves its entry in JACK's shared-memory registry,
    and after a few of those no new server can start on the machine.
    """
    name = f"tarab-doomed-{os.getpid()}"
    jackd = subprocess.Popen([shutil.which("jackd"), "-n", name, "-d", "dummy", "-r", "22050", "-p", "256"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = {"JACK_DEFAULT_SERVER": name}
        assert subprocess.run(["jack_wait", "-w", "-t", "10"], env={**os.environ, **env}).returncode == 0
        p = _popen("monitor", "--json", env=env)
        assert json.loads(p.stdout.readline())["event"] == "level"
        jackd.terminate()
        jackd.wait(10)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 3, err
        assert "audio server stopped" in err
        _no_traceback(err)
    finally:
        if jackd.poll() is None:
            jackd.terminate()
            jackd.wait(10)
        # the abandoned client's semaphore outlives both processes: remove it
        import glob

        for f in glob.glob(f"/dev/shm/jack_sem.*_{name}_*"):
            os.unlink(f)


@pytest.mark.parametrize("cmd,expect", [("monitor", "rms"), ("live", "warming up")])
def test_rich_displays_render(jack_server, cmd, expect):
    """The human displays (rich Live) start, render and end cleanly without a terminal."""
    def once():
        r = run_cli(cmd, "--seconds", "1.5")
        assert r.returncode == 0, r.stderr
        return r

    # the display's last status line counts the run's xruns, its late callbacks and how many of
    # those were tarab's (EngineStats.line), and the hypervisor's steal (rerun after a graph xrun)
    def status(r):
        flat = re.sub(r"\s+", " ", r.stdout)  # the display may wrap its status line
        return {"xruns": int(re.findall(r"xruns (\d+)", flat)[-1]),
                "late_by_tarab": int(re.findall(r"late \d+ \((\d+) tarab's\)", flat)[-1]),
                "steal_pct": float(re.findall(r"steal ([\d.]+)%", flat)[-1])}

    r = repeat_on_graph_xrun(once, status)
    st = status(r)
    assert expect in r.stdout and tarab_on_time(st), r.stdout
    _no_traceback(r.stderr)


def test_preset_sets_engine_and_classifier_and_cli_overrides(jack_server, tmp_path):
    r = run_cli("live", "--preset", "studio-dry", "--seconds", "6.5", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    ests = [x for x in lines if "probabilities" in x]
    assert lines[-1]["block_size"] == 128  # [engine] block_size = 128
    step = ests[-1]["frame_end"] - ests[-2]["frame_end"]
    assert step == 5  # [classifier] rate_hz = 8 → every 5 mel frames
    r = run_cli("monitor", "--preset", "studio-dry", "--block", "512", "--seconds", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["block_size"] == 512
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nblock_size = 3\n")
    r = run_cli("monitor", "--preset", bad, "--seconds", "1")
    assert r.returncode == 2 and "block_size: 3 is out of range" in r.stderr and str(bad) in r.stderr
    _no_traceback(r.stderr)
