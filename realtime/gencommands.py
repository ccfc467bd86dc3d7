"""Generation subcommands: ``generate``, ``train-generator``, ``evaluate-generation``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from models.errors import ParameterError


ADV_STEPS = 500  # the shipped recipe: 500 and 1500 batches of 64 measured the same (embedding FD 11.0 vs 11.1)


def cmd_generate(args) -> int:
    from .audiofile import check_audio_path, peak_safe, write_audio
    from .generate import StyleSynth, load_generator

    bundle = load_generator(args.model)
    synth = StyleSynth(bundle, n_iter=args.iterations)
    if args.list:
        for lab in synth.labels:
            print(lab)
        return 0
    if args.composer is None or args.output is None:
        raise ParameterError("give --composer and -o/--output (or --list)")
    synth.composer_index(args.composer)
    if args.to is not None:
        synth.composer_index(args.to)
    if args.mix != 0.0 and args.to is None:
        raise ParameterError("--mix needs --to (the composer to mix toward)")
    if not args.seconds > 0 or args.seconds > 3600:
        raise ParameterError(f"--seconds must be in (0, 3600], got {args.seconds}")
    synth.set_target(args.composer, args.to, args.mix, args.temperature)
    out = check_audio_path(args.output, args.force)
    if args.sweep and args.to is None:
        raise ParameterError("--sweep needs --to (the composer to morph toward)")
    synth.start(args.seed)
    y = synth.render(int(round(args.seconds * synth.sr)), progress=not args.json,
                     sweep=(args.composer, args.to, args.mix if args.mix > 0 else 1.0) if args.sweep else None)
    y, gain_db = peak_safe(y)  # the decoder's transients can exceed full scale: no clipped files
    write_audio(out, y, synth.sr, force=args.force)
    summary = {"gain_db": round(gain_db, 2), "output": str(out), "composer": args.composer, "to": args.to, "mix": args.mix, "sweep": args.sweep,
               "temperature": args.temperature, "seed": args.seed, "seconds": round(len(y) / synth.sr, 3),
               "sr": synth.sr, "peak": round(float(abs(y).max()), 4)}
    print(json.dumps(summary) if args.json else
          f"wrote {out}: {summary['seconds']} s of {args.composer}"
          + ((f" → {args.to} (mix sweeping 0 → {args.mix if args.mix > 0 else 1.0:g})" if args.sweep
              else f" → {args.to} (mix {args.mix:g})") if args.to else "") + f", seed {args.seed}")
    return 0


def cmd_train_generator(args) -> int:
    import torch

    from models.generator import GenConfig, finetune_generator, train_generator

    from .commands import _featurizer

    cfg = GenConfig(epochs=args.epochs, seed=args.seed, max_train_windows=args.max_train_windows,
                    time_budget_s=args.time_budget * 60.0, threads=args.threads,
                    extra_train=str(args.extra_train) if args.extra_train else "",
                    other_train=str(args.other_train) if args.other_train else "",
                    adv_steps=args.adversarial_steps, adv_weight=args.adversarial_weight,
                    fm_weight=args.feature_matching_weight)
    cfg.validate()
    if args.from_bundle is not None and (args.adversarial_steps <= 0 or args.resume):
        raise ParameterError("--from runs only the adversarial stage: give --adversarial-steps N > 0, not --resume")
    torch.set_num_threads(args.threads)
    featurize, mel_config = _featurizer(args)
    if args.from_bundle is not None:
        r = finetune_generator(args.from_bundle, args.data_dir, args.output, featurizer=featurize,
                               mel_config=mel_config, steps=args.adversarial_steps, adv_weight=args.adversarial_weight,
                               fm_weight=args.feature_matching_weight, threads=args.threads, cache_dir=args.cache_dir,
                               force=args.force, progress=not args.json)
        summary = {"bundle": r["bundle"], "test_mse_before": r["test_before"]["mse"], "test_mse": r["test"]["mse"],
                   "steps": r["steps"], "minutes": round(r["seconds"] / 60, 2)}
        print(json.dumps(summary) if args.json else
              f"bundle {r['bundle']}: {r['steps']} adversarial steps in {r['seconds'] / 60:.1f} min; test "
              f"reconstruction MSE {r['test_before']['mse']:.3f} → {r['test']['mse']:.3f} (normalised)")
        return 0
    r = train_generator(args.data_dir, args.output, featurizer=featurize, mel_config=mel_config, config=cfg,
                        cache_dir=args.cache_dir, resume=args.resume, force=args.force, progress=not args.json)
    summary = {"bundle": r["bundle"], "test_mse": r["test"]["mse"], "test_kl": r["test"]["kl"], "params": r["params"],
               "epochs_run": r["epochs_run"], "best_epoch": r["best_epoch"],
               "train_minutes": round(r["train_seconds"] / 60, 2)}
    print(json.dumps(summary) if args.json else
          f"bundle {r['bundle']}: test reconstruction MSE {r['test']['mse']:.3f} (normalised), KL {r['test']['kl']:.1f}; "
          f"{r['params']} parameters, {r['epochs_run']} epochs in {r['train_seconds'] / 60:.1f} min")
    return 0


def cmd_evaluate_generation(args) -> int:
    from .gen_eval import evaluate_generation, print_report

    res = evaluate_generation(args.data_dir, generator=args.model, classifier=args.classifier, clips=args.clips,
                              seconds=args.seconds, cache_dir=args.cache_dir, plots=args.plots,
                              progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print_report(res, sys.stdout)
    return 0


def register(sub) -> None:
    from .commands import add_extra_data_args, add_mel_args

    s = sub.add_parser("generate", help="generate audio in a composer's style (optionally morphing to another)")
    s.add_argument("--composer", help="composer to generate (see --list)")
    s.add_argument("--to", default=None, help="second composer to morph toward")
    s.add_argument("--mix", type=float, default=0.0, help="0 = --composer, 1 = --to (default 0)")
    s.add_argument("--seconds", type=float, default=10.0, help="length [s] (default 10)")
    s.add_argument("--sweep", action="store_true", help="morph during the clip: mix goes from 0 to --mix (or 1)")
    s.add_argument("--temperature", type=float, default=1.0, help="latent spread: 0 = the composer's centre (default 1)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same audio (default 0)")
    s.add_argument("--iterations", type=int, default=12, help="fast Griffin-Lim iterations per block (default 12)")
    s.add_argument("-o", "--output", type=Path, default=None, help="audio file (.wav .flac .ogg .aiff .mp3)")
    s.add_argument("--model", type=Path, default=None, help="generator bundle (default: the shipped one)")
    s.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    s.add_argument("--list", action="store_true", help="print the composers the bundle knows")
    s.add_argument("--json", action="store_true", help="print a JSON summary; no progress bar")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("train-generator", help="train the composer-style generator and export a bundle")
    s.add_argument("data_dir", type=Path, help="folder with one sub-folder of audio files per composer")
    s.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to create")
    s.add_argument("--epochs", type=int, default=36)
    s.add_argument("--seed", type=int, default=0, help="also the piece split's seed (keep the classifier's)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--max-train-windows", type=int, default=16000, help="windows per epoch (0 = all)")
    add_extra_data_args(s)
    s.add_argument("--time-budget", type=float, default=0.0, help="stop after the epoch that passes this many minutes")
    s.add_argument("--adversarial-steps", type=int, default=ADV_STEPS,
                   help=f"batches of the adversarial stage after the VAE (default {ADV_STEPS}; 0 = none)")
    s.add_argument("--adversarial-weight", type=float, default=0.1, help="weight of the critic's verdict (default 0.1)")
    s.add_argument("--feature-matching-weight", type=float, default=0.5,
                   help="weight of critic feature matching (default 0.5)")
    s.add_argument("--from", dest="from_bundle", type=Path, default=None,
                   help="a trained generator bundle: run only the adversarial stage on it (same data and split)")
    s.add_argument("--cache-dir", type=Path, default=None)
    s.add_argument("--resume", action="store_true")
    s.add_argument("--force", action="store_true")
    s.add_argument("--json", action="store_true")
    add_mel_args(s)
    s.set_defaults(func=cmd_train_generator)

    s = sub.add_parser("evaluate-generation", help="style accuracy, realism, reconstruction, novelty, morph")
    s.add_argument("data_dir", type=Path, nargs="?", default=None,
                   help="the corpus (default ../shared/corpus/symbtr8 if present)")
    s.add_argument("--model", type=Path, default=None, help="generator bundle (default: the shipped one)")
    s.add_argument("--classifier", type=Path, default=None, help="classifier bundle (default: the shipped one)")
    s.add_argument("--clips", type=int, default=10, help="clips per composer (default 10)")
    s.add_argument("--seconds", type=float, default=10.0, help="clip length [s] (default 10)")
    s.add_argument("--plots", type=Path, default=None, help="write example spectrogram PNGs here")
    s.add_argument("--cache-dir", type=Path, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evaluate_generation)


def cmd_render(args) -> int:
    from .classify import load_classifier
    from .generate import load_generator
    from .presets import load_preset
    from .render import render_file

    from models.errors import check_range

    check_range("--mix", args.mix, -120.0, 24.0)
    preset = load_preset(args.preset or "default")
    classifier = load_classifier(args.model or preset.classifier.get("model"))
    generator = load_generator(args.generator) if args.layer != "none" else None
    if args.layer not in ("none", "auto") and args.layer not in generator.card.labels:
        raise ParameterError(f"--layer: unknown composer {args.layer!r}; use none, auto or one of: "
                             f"{', '.join(generator.card.labels)}")
    import torch

    torch.set_num_threads(1)
    s = render_file(args.input, args.output, preset=preset, classifier=classifier, generator=generator,
                    layer=args.layer, level_db=args.mix, seed=args.seed, block_size=args.block,
                    timeline_png=args.timeline, force=args.force, progress=not args.json)
    if args.json:
        print(json.dumps(s))
    else:
        top = sorted(s["probabilities"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{s['input']} → {s['output']} ({s['seconds']:.1f} s, {s['sr']} Hz, {s['channels']} ch) through "
              f"preset '{s['preset']}' [{' → '.join(s['fx']) or 'no FX'}]")
        print("  composer: " + ", ".join(f"{k} {v:.2f}" for k, v in top) + f" ({s['windows']} windows)")
        if s["layer"] != "none":
            print(f"  generated layer: {', '.join(s['layer_composers']) or '(input stayed silent)'} at {s['layer_level_db']:+.1f} dB")
        print(f"  timeline: {s['timeline_json']}" + (f", {s['timeline_png']}" if s["timeline_png"] else "")
              + f"; {s['x_realtime']:.0f}× real time")
    return 0


def register_render(sub) -> None:
    from .cli import add_preset_arg

    s = sub.add_parser("render", help="file → classification timeline + generated layer + FX chain → file")
    s.add_argument("input", type=Path, help="audio file (WAV/FLAC/OGG/MP3/AIFF, any rate and channel count)")
    s.add_argument("-o", "--output", type=Path, required=True, help="audio file to write (format from extension)")
    s.add_argument("--layer", default="none", help="generated layer: none (default), auto (the detected composer) "
                                                   "or a composer name")
    s.add_argument("--mix", type=float, default=-12.0, help="level of the generated layer [dB] (default -12)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated layer (default 0)")
    s.add_argument("--block", type=int, default=None, help="block size (default: the preset's engine block size)")
    s.add_argument("--model", type=Path, default=None, help="classifier bundle (default: the preset's or shipped)")
    s.add_argument("--generator", type=Path, default=None, help="generator bundle (default: the shipped one)")
    s.add_argument("--timeline", action="store_true", help="also write OUT-stem.timeline.png")
    s.add_argument("--force", action="store_true", help="overwrite OUT and its sidecars")
    s.add_argument("--json", action="store_true", help="print a JSON summary; no progress bar")
    add_preset_arg(s)
    s.set_defaults(func=cmd_render)


def cmd_play(args) -> int:
    from .audiofile import AudioWriter, check_audio_path
    from .cli import _engine_from_args, finish_run, resolve_settings
    from .generate import load_generator
    from .midi import MidiInput
    from .play import build_player
    from .presets import load_preset
    from .units import Chain, Recorder

    preset = load_preset(args.preset or "default")
    resolve_settings(args)
    if args.record is not None:
        check_audio_path(args.record, args.force)
    gen = load_generator(args.model or preset.generator.get("model"))
    inst, chain = build_player(preset, gen, sr=args.sr, block_size=args.block, channels=args.channels)
    rec = Recorder(seconds=30.0) if args.record is not None else None
    unit = Chain([chain, rec]) if rec is not None else chain
    port = args.midi or preset.midi.get("port")
    midi = MidiInput(inst.handle, port=port, virtual=port is None, name=args.midi_name, on_idle=inst.apply)
    inst.start()
    engine = _engine_from_args(unit, args)
    try:
        engine.start()
        midi.start()
        writer = AudioWriter(args.record, engine.sr, args.channels, force=args.force) if rec is not None else None
        with writer if writer is not None else contextlib.nullcontext():
            def drain(_eng=None):
                if writer is not None:
                    writer.write(rec.drain().T)

            info = {"event": "ready", "midi_port": midi.port_name, "midi_api": midi.api, "sr": engine.sr,
                    "block_size": engine.block_size, "voices": len(inst.voices), "composers": inst.map.composers}
            if args.json:
                print(json.dumps(info), flush=True)

                def tick(eng):
                    drain()
                    if time.monotonic() - tick.last >= 1.0:
                        tick.last = time.monotonic()
                        print(json.dumps({"event": "status", **_status(inst, eng, midi)}), flush=True)
                tick.last = time.monotonic()
                reason = engine.run(args.seconds, on_tick=tick)
            else:
                from rich.live import Live

                print(f"tarab play: MIDI in '{midi.port_name}' ({midi.api}); {len(inst.voices)} voices; "
                      f"keys → {', '.join(inst.map.composers)}; Ctrl-C stops")
                with Live(_play_view(inst, engine, midi), refresh_per_second=8) as live:
                    def tick(eng):
                        drain()
                        live.update(_play_view(inst, eng, midi))
                    reason = engine.run(args.seconds, on_tick=tick)
            drain()
            return finish_run(engine, reason, json_out=args.json)
    finally:
        engine.stop()
        midi.close()
        inst.stop()


def _status(inst, engine, midi) -> dict:
    st = engine.stats(recent=200)
    snap = inst.snapshot()
    gens = [v.gen for v in inst.voices]
    return {**snap, "midi_received": midi.received, "midi_malformed": midi.malformed, "xruns": st.xruns,
            "callback_p999_pct": round(100.0 * st.callback_p999_ms / max(st.block_period_ms, 1e-9), 2),
            "latency_ms": round(st.total_latency_ms, 1),
            "underruns": sum(g.underruns for g in gens), "generator_faults": sum(g.faults for g in gens)}


def _play_view(inst, engine, midi):
    from rich.table import Table

    s = _status(inst, engine, midi)
    t = Table(title="tarab play", expand=False)
    for c in ("voice", "note", "composer", "state", "level"):
        t.add_column(c)
    for i, v in enumerate(s["voices"]):
        if v["state"] != "free":
            t.add_row(str(i), str(v["note"]), v["composer"], v["state"], f"{v['level_db']:.0f} dB")
    t.caption = (f"mix {s['mix']:.2f} → next composer | temperature {s['temperature']:.2f} | transpose "
                 f"{s['transpose']:+.2f} st | sustain {'on' if s['sustain'] else 'off'} | program {s['program']}\n"
                 f"{engine.stats(recent=200).line()} | MIDI {s['midi_received']} msgs ({s['midi_malformed']} malformed)"
                 f" | underruns {s['underruns']}")
    return t


def register_play(sub) -> None:
    from .cli import add_audio_args, add_preset_arg

    s = sub.add_parser("play", help="MIDI-controlled live generation (notes trigger composers, CCs morph)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--midi", metavar="PORT", default=None, help="connect to the MIDI input port whose name contains PORT")
    g.add_argument("--virtual", action="store_true", help="create a virtual MIDI input port (the default)")
    s.add_argument("--midi-name", default="tarab-midi-in", help="name of tarab's MIDI port (default tarab-midi-in)")
    s.add_argument("--model", type=Path, default=None, help="generator bundle (default: the preset's or shipped)")
    s.add_argument("--record", type=Path, default=None, help="also write what is played to this audio file")
    s.add_argument("--force", action="store_true", help="overwrite --record's file")
    s.add_argument("--json", action="store_true", help="JSON lines (ready, status each second, end)")
    add_audio_args(s)
    add_preset_arg(s)
    s.set_defaults(func=cmd_play)
