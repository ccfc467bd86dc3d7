"""Subcommands beyond ``devices``/``monitor``: training, evaluation, classification, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from models.errors import ParameterError

from . import mel as _mel


def add_mel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features (librosa names)")
    g.add_argument("--n-fft", type=int, default=_mel.N_FFT)
    g.add_argument("--hop-length", type=int, default=_mel.HOP_LENGTH)
    g.add_argument("--n-mels", type=int, default=_mel.N_MELS)


def featurizer_for(mel: dict):
    """``(featurize, mel_config)`` for training and evaluation: the live engine's ``StreamingMel``."""
    sm = _mel.StreamingMel(**mel)
    return sm.transform, sm.config


def _featurizer(args):
    return featurizer_for(dict(sr=_mel.SR, n_fft=args.n_fft, hop_length=args.hop_length, n_mels=args.n_mels))


# ---- train -----------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from models.train import TrainConfig, train

    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      init_seed=args.init_seed,
                      patience=args.patience, window_frames=args.window_frames,
                      max_train_windows=args.max_train_windows, time_budget_s=args.time_budget * 60.0,
                      leaky_window_split=args.leaky_window_split,
                      extra_train=str(args.extra_train) if args.extra_train else "",
                      other_train=str(args.other_train) if args.other_train else "", aux_weight=args.aux_weight)
    cfg.validate()
    import torch

    torch.set_num_threads(args.threads)
    featurize, mel_config = _featurizer(args)
    res = train(args.data_dir, args.output, featurizer=featurize, mel_config=mel_config, config=cfg,
                cache_dir=args.cache_dir, resume=args.resume, force=args.force, progress=not args.json)
    if "bundle" not in res:  # a non-zero DDP rank
        return 0
    t = res["test"]
    summary = {"bundle": res["bundle"], "window_accuracy": t["window_accuracy"], "piece_accuracy": t["piece_accuracy"],
               "macro_f1": t["macro_f1"], "params": res["params"], "epochs_run": res["epochs_run"],
               "best_epoch": res["best_epoch"], "train_minutes": round(res["train_seconds"] / 60, 2),
               "skipped": [p for p, _ in res["skipped"]]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"bundle {res['bundle']}: {_test_line(t)}; "
              f"{res['params']} parameters, {res['epochs_run']} epochs in {res['train_seconds'] / 60:.1f} min")
    return 0


def _test_line(t: dict) -> str:
    return (f"test window accuracy {t['window_accuracy']:.3f}, piece accuracy {t['piece_accuracy']:.3f}, "
            f"macro F1 {t['macro_f1']:.3f} ({t['n_pieces']} pieces, {t['n_windows']} windows)")


def cmd_ensemble(args) -> int:
    from models.ensemble import ensemble_bundles

    res = ensemble_bundles(args.members, args.output, args.data_dir, featurizer_for=featurizer_for,
                           cache_dir=args.cache_dir, force=args.force, progress=not args.json)
    t = res["test"]
    if args.json:
        print(json.dumps({"bundle": res["bundle"], "window_accuracy": t["window_accuracy"],
                          "piece_accuracy": t["piece_accuracy"], "macro_f1": t["macro_f1"], "params": res["params"],
                          "members": res["members"]}))
    else:
        print(f"bundle {res['bundle']} ({len(res['members'])} members, {res['params']} parameters): {_test_line(t)}")
        for m in res["members"]:
            mt = m["test"] or {}
            print(f"  member {m['bundle']}: window {mt.get('window_accuracy', float('nan')):.3f}, "
                  f"piece {mt.get('piece_accuracy', float('nan')):.3f}")
    return 0


def cmd_rerender(args) -> int:
    from models.errors import DataError
    from models.rerender import rerender_corpus

    pieces = None
    if args.split:
        try:
            split = json.loads(args.split.read_text())
            pieces = set(split[args.split_set])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{args.split}: not a split file with a {args.split_set!r} list ({e})") from None
    try:
        programs = [int(p) for p in args.programs.split(",")]
    except ValueError:
        raise ParameterError(f"--programs: comma-separated GM program numbers, got {args.programs!r}") from None
    res = rerender_corpus(args.corpus, args.midi, args.output, programs=programs, pieces=pieces,
                          include_own=args.include_own, other_pieces=args.other_pieces, soundfont=args.soundfont,
                          jobs=args.jobs, progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        short = f", {res['short']} under 5 s left out" if res["short"] else ""
        print(f"{args.output}: {res['rendered']} rendered, {res['kept']} already there{short}, {len(res['failed'])} failed; "
              f"{res['seconds'] / 3600:.2f} h of audio in {res['files']} files; manifest {res['manifest']}")
        for rel, why in res["failed"]:
            print(f"  failed: {rel}: {why}", file=sys.stderr)
    return 1 if res["failed"] else 0


def cmd_ceiling(args) -> int:
    from models.ceiling import corpus_ceiling

    res = corpus_ceiling(args.corpus, args.midi, audio=args.audio, folds=args.folds, repeats=args.repeats,
                         seed=args.seed, trees=args.trees, excerpt=args.excerpt, jobs=args.jobs,
                         progress=not args.json)
    if args.json:
        print(json.dumps(res))
        return 0
    what = f"accuracy over {res['n_rows']} excerpts of {args.excerpt:g} s" if args.excerpt else "piece accuracy"
    print(f"{res['n_pieces']} pieces, {len(res['composers'])} composers; {what} of a random forest, "
          f"{res['folds']}-fold piece-level cross-validation x {res['repeats']} shuffles "
          f"(chance {100 / len(res['composers']):.1f} %):")
    width = max(map(len, res["results"]))
    for name, r in res["results"].items():
        print(f"  {name:<{width}}  {100 * r['mean']:5.1f} % ± {100 * r['sd']:.1f}")
    return 0


def cmd_evaluate(args) -> int:
    from models.evaluate import confusion_png, curves_png, evaluate_bundle

    from .atomic import atomic_output
    from .classify import load_classifier

    bundle = load_classifier(args.model)
    sm = _mel.StreamingMel(**bundle.card.mel_config())
    res = evaluate_bundle(bundle, args.data_dir, featurizer=sm.transform, mel_config=sm.config,
                          cache_dir=args.cache_dir, split=args.split, progress=not args.json)
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.plots / "confusion.png", force=True) as tmp:
            confusion_png(tmp, res)
        hist = bundle.path / "history.json"
        if hist.is_file():
            with atomic_output(args.plots / "training_curves.png", force=True) as tmp:
                curves_png(tmp, json.loads(hist.read_text()))
    keys = ("window_accuracy", "piece_accuracy", "macro_f1", "per_class", "n_pieces", "n_windows", "ci95")
    if args.json:
        print(json.dumps({k: res[k] for k in keys} | {"scope": res["scope"]}))
    else:
        print(f"{bundle.card.name} on {res['scope']}: {res['n_pieces']} pieces, {res['n_windows']} windows")
        ci = {k: f"{lo:.3f}-{hi:.3f}" for k, (lo, hi) in res["ci95"].items()}
        print(f"  window accuracy {res['window_accuracy']:.3f} (95 % CI {ci['window_accuracy']})   piece accuracy "
              f"{res['piece_accuracy']:.3f} (95 % CI {ci['piece_accuracy']})   macro F1 {res['macro_f1']:.3f}")
        for lab, d in res["per_class"].items():
            wr = "-" if d["window_recall"] is None else f"{d['window_recall']:.2f}"
            pr = "-" if d["piece_recall"] is None else f"{d['piece_recall']:.2f}"
            print(f"  {lab:<20} window recall {wr:>5}  piece recall {pr:>5}  ({d['pieces']} pieces)")
    return 0


def cmd_presets(args) -> int:
    from .presets import load_preset, shipped_presets

    rows = []
    for path in shipped_presets():
        pr = load_preset(path)
        rows.append({"name": pr.name, "description": pr.description, "path": str(path),
                     "fx": [spec["plugin"] for spec in pr.fx]})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            print(f"{r['name']:<{width}}  {r['description']}  [{' → '.join(r['fx']) or 'no FX'}]")
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the ``tarab`` parser."""
    from models.train import ARCH_NAMES  # numpy only: cheap at start-up
    s = sub.add_parser("train", help="train a composer classifier and export a bundle")
    s.add_argument("data_dir", type=Path, help="folder with one sub-folder of audio files per composer")
    s.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to create")
    s.add_argument("--arch", choices=ARCH_NAMES, default="temporal",
                   help="temporal: 1-D convolutions over time (default, shipped); compact: 2-D depthwise-separable CNN; "
                        "paper: the paper's exp-5 CNN")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--patience", type=int, default=6, help="early stopping: epochs without validation improvement")
    s.add_argument("--window-frames", type=int, default=216, help="frames per window (216 ≈ 5 s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the piece split (and of the weights, unless --init-seed)")
    s.add_argument("--init-seed", type=int, default=-1,
                   help="seed of the weights, augmentation and batch order (default: --seed); members of an "
                        "ensemble share --seed and differ here")
    s.add_argument("--aux-weight", type=float, default=0.0,
                   help="> 0: also learn each training window's makam, form and usul (from SymbTr piece ids) with "
                        "this loss weight; the heads are training-only, the bundle predicts composers")
    s.add_argument("--threads", type=int, default=2, help="torch threads per process")
    s.add_argument("--max-train-windows", type=int, default=0, help="subsample training windows per epoch (0 = all)")
    s.add_argument("--time-budget", type=float, default=0.0, help="stop after the epoch that passes this many minutes")
    s.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default ~/.cache/tarab/features)")
    add_extra_data_args(s)
    s.add_argument("--leaky-window-split", action="store_true",
                   help="split windows, not pieces (the paper's leaky protocol; only to measure the gap)")
    s.add_argument("--resume", action="store_true", help="continue the run in OUTPUT.train/")
    s.add_argument("--force", action="store_true", help="overwrite OUTPUT (and restart OUTPUT.train/)")
    s.add_argument("--json", action="store_true", help="print a JSON summary; no progress bars")
    add_mel_args(s)
    s.set_defaults(func=cmd_train)
    from models.rerender import GM_PROGRAMS

    s = sub.add_parser("rerender", help="render the corpus's pieces again with other instruments (training data)")
    s.add_argument("corpus", type=Path, help="the corpus (its manifest.csv names each piece's MIDI, program, tempo)")
    s.add_argument("--midi", type=Path, required=True, help="folder of the SymbTr MIDI files (SymbTr's midi/)")
    s.add_argument("-o", "--output", type=Path, required=True, help="data set to write (kept files are reused)")
    s.add_argument("--programs", default=",".join(map(str, GM_PROGRAMS)),
                   help="GM programs to render, comma-separated (default: the corpus's 8)")
    s.add_argument("--include-own", action="store_true", help="also render each piece with its own program")
    s.add_argument("--split", type=Path, default=None, help="a split.json: render only the pieces of --split-set")
    s.add_argument("--other-pieces", type=int, default=0, metavar="N",
                   help="instead, render up to N SymbTr scores per composer that are NOT in the corpus (nor versions "
                        "of its pieces), each with every --programs: more pieces to train on (tarab train --other-train)")
    s.add_argument("--split-set", choices=["train", "val", "test"], default="train")
    s.add_argument("--soundfont", type=Path, default=None, help="GM soundfont (default FluidR3_GM)")
    s.add_argument("--jobs", type=int, default=2, help="FluidSynth processes at once")
    s.add_argument("--json", action="store_true", help="print a JSON summary; no progress bar")
    s.set_defaults(func=cmd_rerender)
    s = sub.add_parser("ceiling", help="how well the composer can be told from each piece's notes (score or yin)")
    s.add_argument("corpus", type=Path, help="the corpus (its manifest.csv names each piece's MIDI score)")
    s.add_argument("--midi", type=Path, required=True, help="folder of the SymbTr MIDI files (SymbTr's midi/)")
    s.add_argument("--audio", action="store_true", help="also transcribe the corpus's audio (librosa.yin)")
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--repeats", type=int, default=3, help="cross-validations with different shuffles")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--trees", type=int, default=500, help="trees in each random forest")
    s.add_argument("--excerpt", type=float, default=0.0, metavar="SECONDS",
                   help="classify SECONDS-long parts of each piece instead of whole pieces (folds still by piece)")
    s.add_argument("--jobs", type=int, default=2, help="processes for --audio")
    s.add_argument("--json", action="store_true", help="print a JSON summary; no progress bars")
    s.set_defaults(func=cmd_ceiling)
    s = sub.add_parser("ensemble", help="average classifier bundles trained on one split (tarab train --init-seed)")
    s.add_argument("data_dir", type=Path, help="the members' data set (the ensemble is evaluated on its test pieces)")
    s.add_argument("members", type=Path, nargs="+", help="classifier bundles with the same labels, features and split")
    s.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to create")
    s.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default ~/.cache/tarab/features)")
    s.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    s.add_argument("--json", action="store_true", help="print a JSON summary; no progress bar")
    s.set_defaults(func=cmd_ensemble)
    _register_classify(sub)
    _register_demo(sub)

    s = sub.add_parser("presets", help="list the shipped presets (validated) with a one-line description")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("evaluate", help="evaluate a classifier bundle on the test pieces of its split")
    s.add_argument("data_dir", type=Path, help="the folder-per-composer data set")
    s.add_argument("--model", type=Path, default=None, help="classifier bundle (default: the shipped one)")
    s.add_argument("--split", choices=["test", "val", "train"], default="test")
    s.add_argument("--plots", type=Path, default=None, help="write confusion.png and training_curves.png here")
    s.add_argument("--cache-dir", type=Path, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evaluate)


# ---- classify / live ---------------------------------------------------------------------------
def add_extra_data_args(p: argparse.ArgumentParser) -> None:
    """--extra-train and --other-train (training data beyond the data set's training pieces)."""
    p.add_argument("--extra-train", type=Path, default=None, metavar="DIR",
                   help="other renderings of the same pieces (tarab rerender); only training pieces' files are used")
    p.add_argument("--other-train", type=Path, default=None, metavar="DIR",
                   help="pieces outside the data set (tarab rerender --other-pieces), all used for training; "
                        "validation and test stay the data set's")


def add_classifier_args(p: argparse.ArgumentParser) -> None:
    from .classify import DEFAULT_RATE_HZ, DEFAULT_SILENCE_DB, DEFAULT_TIME_CONSTANT_S
    from .cli import add_preset_arg

    p.add_argument("--model", type=Path, default=None, help="classifier bundle (default: the shipped one)")
    p.add_argument("--rate", type=float, default=None, help=f"estimates per second (default {DEFAULT_RATE_HZ})")
    p.add_argument("--smoothing", type=float, default=None,
                   help=f"smoothing time constant [s] (default {DEFAULT_TIME_CONSTANT_S})")
    p.add_argument("--silence-db", type=float, default=None,
                   help=f"below this input level show 'listening' (default {DEFAULT_SILENCE_DB} dBFS)")
    p.add_argument("--json", action="store_true", help="JSON output (one object per line)")
    add_preset_arg(p)


def _resolve_classifier_settings(args) -> None:
    from .classify import DEFAULT_RATE_HZ, DEFAULT_SILENCE_DB, DEFAULT_TIME_CONSTANT_S
    from .cli import resolve_settings

    resolve_settings(args, {"rate": DEFAULT_RATE_HZ, "smoothing": DEFAULT_TIME_CONSTANT_S,
                            "silence_db": DEFAULT_SILENCE_DB})


def cmd_classify(args) -> int:
    from models.errors import TarabError

    from .atomic import atomic_output, check_writable
    from .classify import load_classifier
    from .offline import classify_file

    _resolve_classifier_settings(args)
    bundle = load_classifier(args.model)
    if args.timeline is not None:
        if len(args.files) > 1 and "{stem}" not in str(args.timeline):
            raise ParameterError("--timeline: with several files, put {stem} in the name (e.g. 'tl-{stem}.png')")
    failed = 0
    for f in args.files:
        try:
            png = Path(str(args.timeline).format(stem=Path(f).stem)) if args.timeline else None
            if png is not None:
                check_writable(png, force=True)
            r = classify_file(f, bundle, rate_hz=args.rate, time_constant_s=args.smoothing,
                              silence_db=args.silence_db, keep_mel=png is not None)
        except TarabError as e:
            print(f"tarab: error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps(r.as_dict()), flush=True)
        else:
            top = sorted(zip(r.probabilities, r.labels), reverse=True)[:3]
            alt = ", ".join(f"{lab} {p:.2f}" for p, lab in top)
            print(f"{f}: {r.composer}  ({alt}; {r.windows} windows, {r.seconds:.1f} s)", flush=True)
        if png is not None:
            from .plots import timeline_png

            with atomic_output(png, force=True) as tmp:
                timeline_png(tmp, r.mel, bundle.card.sr, bundle.card.hop_length, r.estimator.estimates,
                             r.labels, title=f"{Path(f).name}: {r.composer}")
    return 1 if failed else 0


def cmd_live(args) -> int:
    from .classify import ClassifierUnit, ClassifierWorker, Estimator, load_classifier
    from .cli import _engine_from_args, finish_run
    from .units import Chain, LevelMeter

    from .presets import load_preset
    from .render import LayerDirector, build_chain, soft_clipped

    from models.errors import check_range

    _resolve_classifier_settings(args)
    check_range("--mix", args.mix, -120.0, 24.0)
    bundle = load_classifier(args.model)
    unit = ClassifierUnit(bundle.card)
    meter = LevelMeter()
    preset = load_preset(args.preset) if args.preset else None
    gen = director = None
    if args.layer != "none":  # the render chain, live: a generated layer under the input
        from .generate import Generator, load_generator

        gb = load_generator(args.generator or (preset.generator.get("model") if preset else None))
        if args.layer == "auto" and list(gb.card.labels) != list(bundle.card.labels):
            raise ParameterError("--layer auto needs a generator that knows the classifier's composers")
        g = preset.generator if preset else {}
        gen = Generator(gb, ahead_s=g.get("ahead_s", 1.0), n_iter=g.get("iterations", 12))
        if args.layer != "auto":
            gen.synth.composer_index(args.layer)
        director = LayerDirector(gen, args.layer)
        gen.start()
    board = preset.build_fx() if (preset is not None and args.fx) else None
    chain = build_chain(unit, layer_source=gen, level_db=args.mix, board=board)
    engine = _engine_from_args(Chain([meter, chain]), args)
    est = Estimator(bundle, unit, args.rate, args.smoothing, args.silence_db)  # warms the model up
    labels = est.labels
    follow = (lambda e: director.on_estimate(e, labels)) if director is not None else (lambda e: None)
    try:
        engine.start()
        if args.json:
            def emit(e):
                follow(e)
                d = e.as_dict(labels)
                d["xruns"] = engine.xruns
                print(json.dumps(d), flush=True)
            worker = ClassifierWorker(est, on_estimate=emit)
            worker.start()
            reason = engine.run(args.seconds)
        else:
            from rich.live import Live

            worker = ClassifierWorker(est, on_estimate=follow)
            worker.start()
            with Live(_live_view(est, meter, engine, labels), refresh_per_second=8) as live:
                reason = engine.run(args.seconds, on_tick=lambda eng: live.update(_live_view(est, meter, eng, labels)))
        worker.stop()
        return finish_run(engine, reason, json_out=args.json, extra={"soft_clipped_samples": soft_clipped(chain)})
    finally:
        engine.stop()
        if gen is not None:
            gen.stop()


def _live_view(est, meter, engine, labels):
    from rich.table import Table

    from .cli import DISPLAY_RECENT, _meter_bar

    e = est.latest
    peak, rms = meter.read_and_clear()
    t = Table.grid(padding=(0, 1))
    t.add_column(justify="right")
    t.add_column()
    t.add_column(justify="right")
    if e is None:
        t.add_row("", "warming up: waiting for the first window", "")
    else:
        order = np.argsort(-e.smoothed)
        for i in order:
            p = float(e.smoothed[i])
            bar = "█" * int(round(p * 40))
            t.add_row(labels[i], f"[cyan]{bar:<40}[/]", f"{p:5.2f}")
        head = ("[yellow]listening… (input too quiet)[/]" if e.listening
                else f"[bold green]{labels[int(order[0])]}[/]  confidence {float(e.smoothed[order[0]]):.2f}")
        t.add_row("leader", head, "")
    t.add_row("input", _meter_bar(rms, 40), f"{rms:6.1f} dB")
    c = est.card
    t.add_row("", f"[dim]{engine.stats(recent=DISPLAY_RECENT).line()} | analysis window {c.window_frames * c.hop_length / c.sr:.1f} s, "
                  f"{est.rate_hz:.2f} estimates/s, smoothing {est.time_constant_s:g} s, skipped {est.skipped}[/]", "")
    return t


def _register_classify(sub) -> None:
    s = sub.add_parser("classify", help="classify audio files (offline, through the live block path)")
    s.add_argument("files", nargs="+", help="audio files (WAV, FLAC, OGG, MP3, AIFF; any rate and channel count)")
    s.add_argument("--timeline", type=Path, default=None,
                   help="write a PNG timeline (use {stem} in the name for several files)")
    add_classifier_args(s)
    s.set_defaults(func=cmd_classify)

    from .cli import add_audio_args

    s = sub.add_parser("live", help="classify the audio input continuously")
    add_audio_args(s)
    add_classifier_args(s)
    s.add_argument("--fx", action="store_true", help="run the input through the preset's FX chain to the output")
    s.add_argument("--layer", default="none", help="add a generated layer: none (default), auto (follows the "
                                                   "leading composer) or a composer name")
    s.add_argument("--mix", type=float, default=-12.0, help="level of the generated layer [dB] (default -12)")
    s.add_argument("--generator", type=Path, default=None, help="generator bundle (default: the shipped one)")
    s.set_defaults(func=cmd_live)


# ---- demo ------------------------------------------------------------------------------------
DEMO_CLIP = Path(__file__).resolve().parent / "clips" / "demo.ogg"


def cmd_demo(args) -> int:
    """The main job on what ships in the repo: classify → generate a morph → render with FX → demo-out/."""
    import time

    import torch

    from .atomic import atomic_output
    from .audiofile import peak_safe, write_audio
    from .classify import load_classifier
    from .generate import StyleSynth, load_generator
    from .plots import spectrograms_png
    from .presets import load_preset
    from .render import render_file

    torch.set_num_threads(1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    classifier = load_classifier(args.model)
    generator = load_generator(args.generator)
    preset = load_preset("default")
    # 1. the clip through the whole chain: rolling classification, a generated layer that follows
    #    the detected composer, the default FX chain
    r = render_file(args.clip, out / "rendered.wav", preset=preset, classifier=classifier, generator=generator,
                    layer="auto", level_db=preset.generator.get("layer_db", -12.0), seed=0, timeline_png=True,
                    force=True, progress=False)
    t_render = time.perf_counter() - t0
    top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])
    a, b = top[0][0], top[1][0]
    # 2. ~10 s of new audio morphing from the leading composer to the second
    t1 = time.perf_counter()
    synth = StyleSynth(generator)
    synth.set_target(a)
    synth.start(0)
    y, _ = peak_safe(synth.render(int(args.seconds * synth.sr), sweep=(a, b, 1.0)))
    write_audio(out / "generated.wav", y, synth.sr, force=True)
    t_gen = time.perf_counter() - t1
    spectrograms_png(out / "spectrograms.png", [(f"{Path(args.clip).name} rendered (clip + generated layer + FX)",
                                                 out / "rendered.wav"),
                                                (f"generated: {a} → {b} ({args.seconds:g} s)", out / "generated.wav")])
    m = classifier.card.metrics.get("test", {})
    summary = {"clip": str(args.clip), "seconds": r["seconds"], "composer": r["composer"],
               "top": [{"composer": k, "probability": v} for k, v in top[:3]], "windows": r["windows"],
               "layer_composers": r["layer_composers"], "morph": {"from": a, "to": b, "seconds": args.seconds},
               "classifier": {"name": classifier.card.name, "test_metrics": m},
               "generator": {"name": generator.card.name, "metrics": generator.card.metrics},
               "render_x_realtime": r["x_realtime"], "render_seconds": round(t_render, 2),
               "generate_seconds": round(t_gen, 2), "generate_x_realtime": round(args.seconds / t_gen, 1),
               "outputs": ["rendered.wav", "rendered.timeline.json", "rendered.timeline.png", "generated.wav",
                           "spectrograms.png", "summary.json"]}
    with atomic_output(out / "summary.json", force=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"tarab demo — {Path(args.clip).name} ({r['seconds']:.1f} s, {r['windows']} rolling estimates)")
    for k, v in top[:3]:
        print(f"  {k:<20} {v:.3f}")
    if m:
        print(f"  (classifier {classifier.card.name}: piece-level test accuracy {m.get('piece_accuracy', 0):.1%}, "
              f"window {m.get('window_accuracy', 0):.1%} — a weak judge; see README)")
    print(f"rendered the clip + a generated layer ({', '.join(r['layer_composers']) or 'none'}) through preset "
          f"'default' in {t_render:.1f} s (models loaded and warmed up included)")
    print(f"generated {args.seconds:g} s morphing {a} → {b} in {t_gen:.1f} s ({args.seconds / t_gen:.0f}× real time)")
    print(f"wrote {out}/: " + ", ".join(summary["outputs"]))
    return 0


def _register_demo(sub) -> None:
    s = sub.add_parser("demo", help="run the main job on the shipped model and demo clip → demo-out/")
    s.add_argument("--clip", type=Path, default=DEMO_CLIP, help="audio file (default: the shipped demo clip)")
    s.add_argument("--model", type=Path, default=None, help="classifier bundle (default: the shipped one)")
    s.add_argument("--generator", type=Path, default=None, help="generator bundle (default: the shipped one)")
    s.add_argument("--seconds", type=float, default=10.0, help="length of the generated morph [s] (default 10)")
    s.add_argument("-o", "--output", type=Path, default=Path("demo-out"), help="output folder (default demo-out/)")
    s.set_defaults(func=cmd_demo)
