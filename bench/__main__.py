"""``python -m bench`` (``make bench``): benchmarks that report ratios measured in one run.

Figures are printed as a table and written to ``bench/results.json``. Run on an otherwise idle
machine; every figure is measured in this run (nothing is compared with stored numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--only", choices=["mel", "inference", "live", "decode", "render", "play"], action="append")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the live run")
    args = p.parse_args(argv)
    todo = args.only or ["mel", "inference", "live", "decode", "render", "play"]
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version()}}
    if "mel" in todo:
        from . import mel

        r = res["mel"] = mel.run()
        print(f"StreamingMel            {r['streaming_mel_us_per_frame']:8.2f} µs/frame with 256-sample blocks, "
              f"{r['streaming_mel_us_per_frame_hop_blocks']:.2f} with one call per hop, "
              f"{r['streaming_mel_us_per_frame_8192_blocks']:.2f} with 8192-sample blocks (target ≤ 10)")
        print(f"librosa, one call/hop   {r['librosa_us_per_window']:8.1f} µs/window  → ours is "
              f"{r['speedup_vs_librosa']:.0f}× faster (target ≥ 150×; median of 7 interleaved rounds)")
        print(f"numpy frame (dense fb)  {r['numpy_frame_us']:8.2f} µs/frame  → ours is "
              f"{r['speedup_vs_numpy_frame']:.2f}× faster (target ≥ 2×)")
    if "inference" in todo:
        from . import engine

        r = res["inference"] = engine.run_classifier_inference()
        print(f"classifier inference    {r['inference_ms_median']:8.2f} ms/window median, p99 "
              f"{r['inference_ms_p99']:.2f} ms (1 thread; target ≤ 3)")
    if "live" in todo:
        from . import engine

        r = res["live"] = engine.run_live(args.seconds)
        print(f"live, block {r['block']} (JACK dummy): round trip {r['round_trip_samples']} samples = "
              f"{r['round_trip_ms']:.1f} ms (PortAudio reports {r['reported_latency_ms']:.1f} ms), xruns {r['xruns']}")
        print(f"callback time with classifier worker: median {r['callback_median_pct']:.2f} %, p99 "
              f"{r['callback_p99_pct']:.2f} %, p99.9 {r['callback_p999_pct']:.2f} %, max {r['callback_max_pct']:.2f} % "
              f"of the block period (target p99.9 ≤ 10 %)")
        print(f"callback CPU time: p99 {r['callback_cpu_p99_pct']:.2f} %, max {r['callback_cpu_max_pct']:.2f} % of the "
              f"period; late callbacks {r['late_callbacks']} ({r['late_by_tarab']} tarab's); hypervisor steal "
              f"{r['steal_pct']:.1f} % of the CPU time")
        print(f"classifier worker: {r['estimates_per_s']:.2f} estimates/s (configured {r['configured_rate_hz']:.2f}), "
              f"{r['worker_cpu_share_of_core'] * 100:.1f} % "
              f"of one core (target ≤ 10 %), skipped {r['skipped_windows']}")
    if "decode" in todo:
        from . import generation

        r = res["decode"] = generation.run_decoding()
        print(f"generator latent → audio {r['decode_x_realtime']:7.1f}× real time on 1 thread "
              f"({r['phase_iterations']} fast Griffin-Lim iterations; target ≥ 50×)")
        print(f"phase reconstruction     {r['phase_only_x_realtime']:7.1f}× real time vs librosa Griffin-Lim 32 "
              f"{r['librosa_gl32_x_realtime']:.1f}× → {r['speedup_vs_librosa_gl32']:.1f}× faster; spectral convergence "
              f"ours {r['sc_ours']:.3f}, librosa GL32 {r['sc_librosa_gl32']:.3f}, librosa fast GL32 {r['sc_librosa_fgl32']:.3f}")
    if "render" in todo:
        from . import generation

        r = res["render"] = generation.run_render()
        print(f"tarab render (1 thread)  {r['no_layer']['x_realtime']:7.1f}× real time without the layer (target ≥ 200×), "
              f"{r['with_layer']['x_realtime']:.1f}× with it (target ≥ 25×); whole {r['minutes']:g}-min file incl. "
              f"set-up: {r['no_layer']['whole_file_x_realtime']:.0f}× / {r['with_layer']['whole_file_x_realtime']:.0f}×")
    if "play" in todo:
        from . import generation

        r = res["play"] = generation.run_play()
        print(f"MIDI note-on → sound     median {r['latency_ms_median']:.1f} ms, p90 {r['latency_ms_p90']:.1f}, max "
              f"{r['latency_ms_max']:.1f} ms over {r['notes_heard']}/{r['notes']} notes (incl. {r['round_trip_ms']:.1f} ms "
              f"output latency; target ≤ 50 ms), xruns {r['xruns_notes']}")
        print(f"callback with {r['voices_sounding']} voices  median {r['callback_median_pct_4_voices']:.2f} %, p99.9 "
              f"{r['callback_p999_pct_4_voices']:.2f} % of the block period (target ≤ 10 %), xruns {r['xruns_4_voices']}")
    out = Path(__file__).with_name("results.json")
    try:  # keep the sections this run did not measure
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        old = {}
    out.write_text(json.dumps({**old, **res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
