"""The render chain — classify → generated layer → FX — for files (``tarab render``) and the live engine.

One chain of :class:`~realtime.units.Unit` s, built by :func:`build_chain`, serves both paths:

- :class:`~realtime.classify.ClassifierUnit` taps the input for the rolling classification,
- :class:`LayerUnit` adds a generated layer (from a :class:`~realtime.generate.Generator` live, or
  a :class:`SyncSource` offline, which produce the same samples) at a level in dB, resampled to
  the stream's rate when it differs from the model's,
- :class:`FxUnit` runs the preset's pedalboard chain with ``reset=False`` so that block after
  block it behaves as one continuous stream,
- :class:`~realtime.units.SoftClip` (knee at -0.45 dBFS) ends a chain with a layer or FX: the
  sum of input and layer can exceed full scale, and pedalboard's ``Limiter`` lets fast transients
  overshoot and hard-clips them at exactly ±1.0; this stage keeps every sample at or under 0.999 and
  leaves anything under the knee untouched.

Given the same input, preset, block size and a fixed layer composer, the offline render and the
live engine produce the same samples (tests/test_render.py checks it through JACK).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from models.errors import DataError, ParameterError, check_range

from .presets import block_invariant
from .ring import Ring
from .units import Chain, SoftClip, Unit

log = logging.getLogger(__name__)

__all__ = ["SyncSource", "LayerUnit", "FxUnit", "build_chain", "soft_clipped", "render_file", "sidecar_paths", "DEFAULT_LAYER_DB"]

DEFAULT_LAYER_DB = -12.0


class SyncSource:
    """Offline stand-in for :class:`~realtime.generate.Generator`: decodes on demand, same samples."""

    def __init__(self, synth):
        self.synth = synth
        self.labels = synth.labels
        self.sr = synth.sr
        self._buf = np.zeros(0, np.float32)
        self._playing = False

    def set_target(self, composer_a, composer_b=None, mix: float = 0.0, temperature: float = 1.0) -> None:
        self.synth.set_target(composer_a, composer_b, mix, temperature)

    def trigger(self, seed: int = 0) -> None:
        self.synth.start(seed)
        self._buf = np.zeros(0, np.float32)
        self._playing = True

    def render(self, n: int) -> np.ndarray:
        if not self._playing:
            return np.zeros(n, np.float32)
        parts = [self._buf]
        have = len(self._buf)
        while have < n:
            y = self.synth.step()
            parts.append(y)
            have += len(y)
        buf = np.concatenate(parts)
        self._buf = buf[n:]
        return buf[:n]


class LayerUnit(Unit):
    """Adds ``source``'s audio (mono, at the model rate) to every channel at ``level_db``.

    ``source`` has ``render(n) -> float32 (n,)`` and ``sr`` (a Generator, a SyncSource or the
    play mixer). With ``replace=True`` the output is the layer alone (the input is dropped).
    """

    def __init__(self, source, level_db: float = DEFAULT_LAYER_DB, replace: bool = False):
        super().__init__()
        self.source = source
        self.replace = replace
        self.level_db = check_range("level_db", level_db, -120.0, 24.0)
        self.gain = float(10.0 ** (self.level_db / 20.0))
        self._warming = False

    def set_warm_up(self, warming):
        self._warming = bool(warming)

    def _prepare(self):
        self._layer = np.zeros((1, self.block_size), np.float32)
        self._resampler = None
        if self.sr != self.source.sr:
            import soxr

            self._resampler = soxr.ResampleStream(self.source.sr, self.sr, 1, dtype="float32", quality="HQ")
            self._fifo = Ring(1, 4 * self.block_size + 16384)
            self._pull = min(4096, max(64, int(np.ceil(self.block_size * self.source.sr / self.sr))))

    def process(self, block, out=None):
        n = block.shape[1]
        layer = self._layer[:, :n]
        if self._warming:  # compile the path without taking audio from the source
            layer[:] = 0.0
        elif self._resampler is None:
            np.multiply(self.source.render(n), self.gain, out=layer[0])
        else:  # keep a small FIFO of resampled layer filled
            while self._fifo.available() < n:
                self._fifo.write(self._resampler.resample_chunk(self.source.render(self._pull))[None])
            self._fifo.read_into(layer)
            layer *= self.gain
        if out is None:
            out = np.empty_like(block)
        if self.replace:
            out[:, :n] = layer
        else:
            np.add(block, layer, out=out[:, :n])
        return out[:, :n]

    def reset(self):
        if self._resampler is not None:
            self._prepare()


class FxUnit(Unit):
    """A pedalboard chain, processed as one continuous stream (``reset=False``).

    :meth:`switch` swaps the chain between blocks (a MIDI program change): one reference
    assignment, so the callback sees either the old or the new board.

    A plugin with latency (an external one, say) may stream fewer samples than it is given until
    its buffers fill, and then return them in bursts. The unit always returns one output sample per input
    sample: silence until the chain's output starts, then the chain's output delayed by the
    largest lag seen so far (a preallocated FIFO absorbs the bursts).
    """

    def __init__(self, board):
        super().__init__()
        self.board = board
        self.lagging = False  # True once the chain returned a block of another length

    def _prepare(self):
        self._fifo = Ring(self.channels, 8 * max(self.block_size, 8192))
        self.lagging = False

    def switch(self, board) -> None:
        board.reset()
        self.board = board

    def process(self, block, out=None):
        n = block.shape[1]
        board = self.board
        if len(board) == 0:
            if out is None:
                return block
            out[:, :n] = block
            return out[:, :n]
        y = board.process(block, float(self.sr), buffer_size=max(self.block_size, n), reset=False)
        if y.shape[1] != n or self.lagging:
            return self._delayed(y, n, out)
        if out is None:
            return y
        out[:, :n] = y
        return out[:, :n]

    def _delayed(self, y, n, out):
        self.lagging = True
        if y.shape[1]:
            self._fifo.write(y)
        if out is None:
            out = np.empty((self.channels, n), np.float32)
        have = self._fifo.available()
        if have >= n:
            self._fifo.read_into(out[:, :n])
        else:  # the lag grew: silence first, then what the chain has given
            out[:, :n - have] = 0.0
            self._fifo.read_into(out[:, n - have:n])
        return out[:, :n]

    def reset(self):
        self.board.reset()
        if self.block_size is not None:
            self._prepare()


def build_chain(classifier_unit, *, layer_source=None, level_db: float = DEFAULT_LAYER_DB, board=None) -> Chain:
    """classifier tap → optional generated layer → optional FX chain → soft clip (after a layer or FX).

    Input alone passes through untouched.
    """
    units = [classifier_unit]
    if layer_source is not None:
        units.append(LayerUnit(layer_source, level_db))
    if board is not None and len(board) > 0:
        units.append(FxUnit(board))
    if len(units) > 1:
        units.append(SoftClip())
    return Chain(units)


class LayerDirector:
    """Drives the layer from the classification: ``'auto'`` follows the leader, else a fixed composer.

    In ``'auto'`` the layer starts at the first non-silent estimate, in its leader's style, and
    then moves to each new leader (the change applies at the generator's next window).
    """

    def __init__(self, source, layer: str, seed: int = 0):
        self.source, self.layer, self.seed = source, layer, seed
        self.current = None
        if layer != "auto":
            source.set_target(layer)
            source.trigger(seed)
            self.current = layer

    def on_estimate(self, est, labels) -> None:
        if self.layer != "auto" or est.listening:
            return
        lead = est.leader(labels)
        if lead == self.current:
            return
        self.source.set_target(lead)
        if self.current is None:
            self.source.trigger(self.seed)
        self.current = lead


def soft_clipped(chain) -> int:
    """Samples the chain's final soft clip shaped (0 without one)."""
    last = chain.units[-1]
    return int(last.shaped) if isinstance(last, SoftClip) else 0


def _timeline_json(summary: dict, timeline: list) -> str:
    """The sidecar: the summary's fields one per line, then one line per estimate (readable, and
    json's C encoder does the long part: an indented dump runs the pure-Python one)."""
    head = json.dumps(summary, indent=1)[:-2]  # without the closing "\n}"
    rows = ",\n  ".join(json.dumps(e) for e in timeline)
    return head + (',\n "timeline": [\n  ' + rows + "\n ]\n}\n" if timeline else ',\n "timeline": []\n}\n')


def sidecar_paths(out: Path) -> tuple[Path, Path]:
    """``song.wav`` → (``song.timeline.json``, ``song.timeline.png``)."""
    return out.with_name(out.stem + ".timeline.json"), out.with_name(out.stem + ".timeline.png")


def render_file(in_path, out_path, *, preset, classifier, generator=None, layer: str = "none",
                level_db: float = DEFAULT_LAYER_DB, seed: int = 0, block_size: int | None = None,
                timeline_png: bool = False, force: bool = False, progress: bool = True,
                engine_blocks: bool | None = None) -> dict:
    """Render a file through the chain into ``out_path`` (atomic), with a JSON timeline sidecar.

    Parameters
    ----------
    preset : realtime.presets.Preset
    classifier : Bundle
    generator : Bundle or None
        Needed unless ``layer == 'none'``.
    layer : 'none', 'auto' or a composer name
    level_db : float
        Level of the generated layer [dB].
    block_size : int or None
        Default: the preset's engine block size (the live engine's), else 256.
    engine_blocks : bool or None
        Process in blocks of ``block_size``, as the live engine does. ``None`` (default) does so
        only when the result could depend on it: with a generated layer (it follows the
        estimates, which arrive between blocks) or an FX plugin outside
        :data:`~realtime.presets.BLOCK_INVARIANT_FX`. Otherwise whole read chunks (8192-sample
        multiples) go through the chain at once — the same samples and the same timeline, faster.
    """
    from tqdm import tqdm

    from models.data import open_audio

    from .atomic import atomic_output, check_writable
    from .audiofile import AudioWriter, check_audio_path
    from .classify import OFFLINE_BATCH, ClassifierUnit, Estimator
    from .offline import _ring_tail, read_blocks

    in_path, out = Path(in_path), Path(out_path)
    t0 = time.perf_counter()
    check_audio_path(out, force)
    js_path, png_path = sidecar_paths(out)
    for p in (js_path, png_path) if timeline_png else (js_path,):
        check_writable(p, force)
    if in_path.resolve() == out.resolve():
        raise ParameterError(f"{out}: the output must not be the input file")
    block = int(block_size or preset.engine.get("block_size", 256))
    check_range("block_size", block, 1, 8192, kind=int)
    cls = preset.classifier
    with open_audio(in_path) as f:
        sr, channels, total = f.samplerate, f.channels, f.frames
    source = None
    if layer != "none":
        if generator is None:
            raise ParameterError("a generated layer needs a generator bundle")
        from .generate import DEFAULT_RHO, StyleSynth

        source = SyncSource(StyleSynth(generator, n_iter=preset.generator.get("iterations", 12),
                                       rho=preset.generator.get("rho", DEFAULT_RHO)))
        if layer != "auto":
            source.synth.composer_index(layer)
        elif list(generator.card.labels) != list(classifier.card.labels):
            raise ParameterError("--layer auto needs a generator that knows the classifier's composers "
                                 f"({', '.join(classifier.card.labels)})")
    unit = ClassifierUnit(classifier.card)
    board = preset.build_fx()
    read = block * max(1, 8192 // block)  # read and write in big chunks; process them in engine blocks or whole
    if engine_blocks is None:
        engine_blocks = source is not None or not block_invariant(board)
    step = block if engine_blocks else read
    chain = build_chain(unit, layer_source=source, level_db=level_db, board=board).prepare(sr, step, channels)
    est = Estimator(classifier, unit, cls.get("rate_hz", 4.0), cls.get("smoothing_s", 2.0), cls.get("silence_db", -55.0))
    director = LayerDirector(source, layer, seed) if source is not None else None
    out_buf = np.zeros((channels, read), np.float32)
    mel_cols = [] if timeline_png else None
    n_done, peak = 0, 0.0
    with contextlib.ExitStack() as stack:
        js_tmp = stack.enter_context(atomic_output(js_path, force))
        png_tmp = stack.enter_context(atomic_output(png_path, force)) if timeline_png else None
        writer = stack.enter_context(AudioWriter(out, sr, channels, force))
        bar = stack.enter_context(tqdm(total=total / sr, unit="s", unit_scale=False, disable=None if progress else True,
                                       leave=False, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{rate_fmt}]"))
        for _, chunk in read_blocks(in_path, read):
            m = chunk.shape[1]
            for a in range(0, m, step):
                x = chunk[:, a:a + step]
                w0 = unit.ring.written
                chain.process(x, out=out_buf[:, a:a + x.shape[1]])
                if mel_cols is not None and unit.ring.written > w0:
                    mel_cols.append(_ring_tail(unit.ring, unit.ring.written - w0))
                k0 = len(est.estimates)
                if engine_blocks:
                    est.poll()
                elif est.batch_ready(OFFLINE_BATCH):  # nothing follows the estimates: classify in batches
                    est.poll(batch=OFFLINE_BATCH)
                if director is not None:
                    for e in est.estimates[k0:]:
                        director.on_estimate(e, est.labels)
            y = out_buf[:, :m]
            if not np.isfinite(y).all():
                raise DataError(f"{in_path}: the FX chain produced NaN/Inf near {n_done / sr:.2f} s")
            peak = max(peak, float(np.abs(y).max()))
            writer.write(y.T)
            n_done += m
            bar.update(m / sr)
        w0 = unit.ring.written
        unit.flush()
        if mel_cols is not None and unit.ring.written > w0:
            mel_cols.append(_ring_tail(unit.ring, unit.ring.written - w0))
        est.poll(batch=1 if engine_blocks else OFFLINE_BATCH)
        est.finish()
        labels = est.labels
        timeline = [e.as_dict(labels) for e in est.estimates]
        probs = est.mean_probs()
        summary = {"input": str(in_path), "output": str(out), "sr": sr, "channels": channels,
                   "seconds": round(n_done / sr, 3), "composer": labels[int(np.argmax(probs))],
                   "probabilities": {lab: round(float(p), 5) for lab, p in zip(labels, probs)},
                   "windows": len(timeline), "layer": layer, "layer_level_db": level_db if layer != "none" else None,
                   "layer_composers": sorted({e["leader"] for e in timeline if not e.get("listening")})
                   if layer == "auto" else ([layer] if layer != "none" else []),
                   "preset": preset.name, "fx": [s.get("plugin") for s in preset.fx], "block_size": block,
                   "processed_in": "engine blocks" if engine_blocks else f"{read}-sample chunks",
                   "peak": round(peak, 4), "soft_clipped_samples": soft_clipped(chain), "latency_samples": chain.latency_samples,
                   "timeline_json": str(js_path), "timeline_png": str(png_path) if timeline_png else None}
        js_tmp.write_text(_timeline_json(summary, timeline))
        if png_tmp is not None:
            from .plots import timeline_png as plot

            mel = np.concatenate(mel_cols, axis=1) if mel_cols else np.zeros((classifier.card.n_mels, 1), np.float32)
            plot(png_tmp, mel, classifier.card.sr, classifier.card.hop_length, est.estimates, labels,
                 title=f"{in_path.name}: {summary['composer']}")
    dt = time.perf_counter() - t0
    summary["render_seconds"] = round(dt, 3)
    summary["x_realtime"] = round(n_done / sr / max(dt, 1e-9), 1)
    return summary
