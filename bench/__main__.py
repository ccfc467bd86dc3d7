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
    p.add_argument("--only", choices=["mel", "inference", "live"], action="append")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the live run")
    args = p.parse_args(argv)
    todo = args.only or ["mel", "inference", "live"]
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version()}}
    if "mel" in todo:
        from . import mel

        r = res["mel"] = mel.run()
        print(f"StreamingMel            {r['streaming_mel_us_per_frame']:8.2f} µs/frame with 256-sample blocks, "
              f"{r['streaming_mel_us_per_frame_hop_blocks']:.2f} with one call per hop (target ≤ 10)")
        print(f"librosa, one call/hop   {r['librosa_us_per_window']:8.1f} µs/window  → ours is "
              f"{r['speedup_vs_librosa']:.0f}× faster (target ≥ 150×)")
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
        print(f"classifier worker: {r['estimates_per_s']:.2f} estimates/s (configured {r['configured_rate_hz']:.2f}), "
              f"{r['worker_cpu_share_of_core'] * 100:.1f} % "
              f"of one core (target ≤ 10 %), skipped {r['skipped_windows']}")
    out = Path(__file__).with_name("results.json")
    try:  # keep the sections this run did not measure
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        old = {}
    out.write_text(json.dumps({**old, **res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
