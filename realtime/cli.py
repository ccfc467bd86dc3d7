"""The ``tarab`` command line: one entry point, argparse subcommands.

Every error tarab raises on purpose (:class:`~models.errors.TarabError`) and every OS error
becomes one line on stderr and a non-zero exit status; Ctrl-C exits with 130, SIGTERM with 143.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys

from models.errors import TarabError

from .engine import DEFAULT_BLOCK, DEFAULT_SR

log = logging.getLogger("tarab")

EXIT_ERROR = 2
DISPLAY_RECENT = 4096  # callbacks the live status line's percentiles cover (≈ 48 s at 256/22050)
EXIT_SERVER_LOST = 3
EXIT_CODES = {"duration": 0, "stopped": 0, "interrupted": 130, "terminated": 143, "server-lost": EXIT_SERVER_LOST}


# ---- shared argument groups ------------------------------------------------------------------
def add_audio_args(p: argparse.ArgumentParser, *, output: bool = True) -> None:
    g = p.add_argument_group("audio device (command line > --preset > defaults)")
    g.add_argument("--input", "-i", metavar="DEVICE", help="input device index or name (default: JACK's, else the system default)")
    if output:
        g.add_argument("--output", metavar="DEVICE", help="output device index or name")
    g.add_argument("--host-api", metavar="API", help="restrict to a host API, e.g. jack or alsa")
    g.add_argument("--sr", type=int, default=None, help=f"sample rate [Hz] (default {DEFAULT_SR})")
    g.add_argument("--block", type=int, default=None, help=f"block size [samples] (default {DEFAULT_BLOCK})")
    g.add_argument("--channels", type=int, default=None, help="channels in and out (default 1)")
    g.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)")
    add_preset_arg(p)


def add_preset_arg(p: argparse.ArgumentParser) -> None:
    if not any("--preset" in a.option_strings for a in p._actions):
        p.add_argument("--preset", metavar="P", help="a shipped preset name or a TOML file (see `tarab presets`)")


# argparse dest -> (preset section, key, default when neither the command line nor the preset sets it)
SETTINGS = {
    "sr": ("engine", "sr", DEFAULT_SR), "block": ("engine", "block_size", DEFAULT_BLOCK),
    "channels": ("engine", "channels", 1), "input": ("engine", "input", None),
    "output": ("engine", "output", None), "host_api": ("engine", "host_api", None),
    "rate": ("classifier", "rate_hz", None), "smoothing": ("classifier", "smoothing_s", None),
    "silence_db": ("classifier", "silence_db", None), "model": ("classifier", "model", None),
}


def resolve_settings(args, defaults: dict | None = None) -> None:
    """Fill every setting the command line left unset from ``--preset``, then from the defaults."""
    from .presets import load_preset

    preset = load_preset(args.preset) if getattr(args, "preset", None) else None
    for dest, (section, key, default) in SETTINGS.items():
        if not hasattr(args, dest) or getattr(args, dest) is not None:
            continue
        value = getattr(preset, section).get(key) if preset is not None else None
        if value is None:
            value = (defaults or {}).get(dest, default)
        if dest == "model" and value is not None:
            from pathlib import Path

            value = Path(value)
        setattr(args, dest, value)


def _engine_from_args(unit, args):
    from .engine import AudioEngine

    return AudioEngine(unit, sr=args.sr, block_size=args.block, input_device=args.input,
                       output_device=getattr(args, "output", None), host_api=args.host_api,
                       in_channels=args.channels, out_channels=args.channels)


def finish_run(engine, reason: str, *, json_out: bool, extra: dict | None = None) -> int:
    """Print the closing summary of a live run and map its end reason to an exit status.

    ``extra`` adds fields to the end event (and ``key value`` pairs to the text line).
    """
    stats = engine.stats()
    extra = extra or {}
    line = " | ".join([stats.line(), *(f"{k.replace('_', ' ')} {v}" for k, v in extra.items())])
    if json_out:
        print(json.dumps({"event": "end", "reason": reason, **stats.as_dict(), **extra}), flush=True)
    if reason == "server-lost":
        print("tarab: error: the audio server stopped (device lost); engine shut down", file=sys.stderr)
    elif reason in ("interrupted", "terminated"):
        print(f"tarab: {reason}; {line}", file=sys.stderr)
    elif not json_out:
        print(line)
    return EXIT_CODES.get(reason, 1)


# ---- devices ---------------------------------------------------------------------------------
def cmd_devices(args) -> int:
    from .devices import AudioDevices, list_midi_ports

    with AudioDevices() as devs:
        apis = devs.host_apis()
        devices = devs.devices()
        for d in devices:
            d["rates"] = devs.supported_rates(d)
    midi = list_midi_ports()
    if args.json:
        print(json.dumps({
            "host_apis": [{"index": a["index"], "name": a["name"], "devices": a["deviceCount"]} for a in apis],
            "devices": [{"index": d["index"], "name": d["name"], "host_api": d["hostApiName"],
                         "inputs": d["maxInputChannels"], "outputs": d["maxOutputChannels"],
                         "default_sr": d["defaultSampleRate"], "rates": d["rates"]} for d in devices],
            "midi": midi}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="Audio host APIs and devices")
    for col in ("#", "device", "host API", "in", "out", "default Hz", "opens at Hz"):
        t.add_column(col)
    for d in devices:
        t.add_row(str(d["index"]), d["name"], d["hostApiName"], str(d["maxInputChannels"]),
                  str(d["maxOutputChannels"]), f"{d['defaultSampleRate']:.0f}", ", ".join(map(str, d["rates"])) or "-")
    con.print(t)
    empty = [a["name"] for a in apis if a["deviceCount"] == 0]
    if empty:
        con.print(f"host APIs without devices: {', '.join(empty)}")
    if not devices:
        con.print("[yellow]no audio devices: start a JACK server (jackd) or connect a sound card[/]")
    m = Table(title="MIDI ports")
    for col in ("API", "dir", "#", "port"):
        m.add_column(col)
    for p in midi:
        if "error" in p:
            m.add_row(p["api"], p["direction"], "-", f"[dim]unavailable: {p['error']}[/]")
        elif not p["ports"]:
            m.add_row(p["api"], p["direction"], "-", "[dim](no ports)[/]")
        for i, name in enumerate(p.get("ports", [])):
            m.add_row(p["api"], p["direction"], str(i), name)
    con.print(m)
    return 0


# ---- monitor ---------------------------------------------------------------------------------
def _meter_bar(db: float, width: int = 40) -> str:
    frac = 0.0 if db == float("-inf") else min(1.0, max(0.0, (db + 60.0) / 60.0))
    n = int(round(frac * width))
    return "█" * n + "·" * (width - n)


def cmd_monitor(args) -> int:
    from .units import LevelMeter

    resolve_settings(args)
    meter = LevelMeter()
    engine = _engine_from_args(meter, args)
    engine.start()
    try:
        if args.json:
            ticks = itertools.count(1)

            def tick(eng):
                if next(ticks) % 5 == 0:  # 2 lines a second at the default 10 ticks/s
                    peak, rms = meter.read_and_clear()
                    print(json.dumps({"event": "level", "peak_db": _num(peak), "rms_db": _num(rms),
                                      "xruns": eng.xruns, "callbacks": eng.callbacks}), flush=True)
            reason = engine.run(args.seconds, on_tick=tick)
        else:
            from rich.live import Live
            from rich.text import Text

            def render(eng):
                peak, rms = meter.read_and_clear()
                t = Text()
                t.append(f"in  {_meter_bar(rms)} rms {rms:6.1f} dB  peak {peak:6.1f} dB\n")
                t.append(eng.stats(recent=DISPLAY_RECENT).line(), style="dim")
                return t

            with Live(render(engine), refresh_per_second=10, transient=False) as live:
                reason = engine.run(args.seconds, on_tick=lambda eng: live.update(render(eng)))
        return finish_run(engine, reason, json_out=args.json)
    finally:
        engine.stop()


def _num(x: float):
    return None if x == float("-inf") else round(x, 2)


# ---- parser and entry point ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tarab", description="Real-time composer classification and composer-style generation.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("devices", help="list audio host APIs/devices and MIDI ports")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_devices)

    s = sub.add_parser("monitor", help="live pass-through with an input level meter, latency and xruns")
    add_audio_args(s)
    s.add_argument("--json", action="store_true", help="print JSON lines instead of the live display")
    s.set_defaults(func=cmd_monitor)

    from . import commands, gencommands

    commands.register(sub)
    gencommands.register(sub)
    gencommands.register_render(sub)
    gencommands.register_play(sub)
    return p


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="tarab: %(levelname)s: %(message)s", stream=sys.stderr)
        return int(args.func(args) or 0)
    except TarabError as e:
        print(f"tarab: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("tarab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:
        print(f"tarab: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1


def entry() -> None:
    """Console-script entry point."""
    code = main()
    from .engine import ABANDONED

    if ABANDONED:  # a stream on a vanished audio server: its finaliser would hang at exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
