"""Composer-style audio from the generator bundle: offline (:class:`StyleSynth`) and live (:class:`Generator`).

Latent → audio, one step per ``hop_frames = W - overlap`` frames (40 of the shipped 64):

1. A noise vector walks an AR(1) path ``u_k = ρ u_{k-1} + √(1-ρ²) ε_k`` (stationary N(0, I)) and
   is mapped into the composer's region of the latent space, ``z_k = μ + T L u_k`` (``μ``, ``L``:
   the bundle's latent Gaussian of composer A, blended linearly toward B's by the mix; ``T``: the
   temperature); the composer embedding is ``slerp(e_A, e_B, mix)``.
2. The TorchScript decoder turns ``(z_k, cond)`` into a log-mel window (``W`` frames); windows
   start every ``hop_frames`` frames, and each window's first and last ``overlap`` frames are
   crossfaded with its neighbours' (sin² / cos² ramps: weights sum to 1); the frames between
   are the window's own. (With ``overlap = W/2`` every frame was an average of two windows, which
   blurs onsets: in the full evaluation, at rho 0.8, the judge's Fréchet distance was 11.1
   against 7.4 with 3/8.)
3. Mel power → linear power, non-negative and consistent with the mel bank
   (:class:`~realtime.mel.MelInverse`, 10 multiplicative updates per frame) → magnitude.
4. :class:`~realtime.phase.PhaseReconstructor` (numba fast Griffin-Lim, block-online) → samples.

:class:`Generator` runs these steps in a worker thread, ahead of time, into a ring; its
:meth:`Generator.render` only copies from the ring, so the audio thread never waits for the model.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from models.bundle import Bundle, load_bundle
from models.errors import ParameterError, check_range

from .mel import MelInverse
from .phase import PhaseReconstructor
from .ring import Ring

log = logging.getLogger(__name__)

__all__ = ["load_generator", "StyleSynth", "Generator", "DecodeGate", "DEFAULT_RHO"]

DEFAULT_RHO = 0.4  # latent correlation between successive windows (hop_frames apart: 0.93 s for the shipped model)
DEFAULT_OVERLAP = 0.375  # share of a window crossfaded with each neighbour (24 of 64 frames)
QUICK_FRAMES = 8  # a phrase's first reconstruction step (frames): its first audio sooner


def load_generator(path=None) -> Bundle:
    """Load the generator bundle at ``path`` (default: the shipped one)."""
    return load_bundle(path, kind="generator")


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    ua, ub = a / max(na, 1e-8), b / max(nb, 1e-8)
    om = float(np.arccos(np.clip(ua @ ub, -1 + 1e-7, 1 - 1e-7)))
    u = (np.sin((1 - t) * om) * ua + np.sin(t * om) * ub) / np.sin(om)
    return (u * ((1 - t) * na + t * nb)).astype(np.float32)


def _bin_map(n_bins: int, ratio: float):
    """Source bin positions for a pitch ratio: bin k takes the magnitude at k / ratio (linear interp.)."""
    src = np.arange(n_bins) / ratio
    i0 = np.clip(np.floor(src).astype(np.int64), 0, n_bins - 1)
    w = np.clip(src - i0, 0.0, 1.0).astype(np.float32)
    w[src >= n_bins - 1] = 0.0
    return i0, w


class StyleSynth:
    """Latent → audio, step by step (one thread at a time).

    Parameters
    ----------
    bundle : Bundle
        A generator bundle (:func:`load_generator`).
    n_iter, momentum, lookahead :
        Phase reconstruction settings (:class:`~realtime.phase.PhaseReconstructor`).
    inverse_iter : int
        Updates of the mel → linear inversion per frame (:class:`~realtime.mel.MelInverse`).
    rho : float in [0, 1)
        Correlation of successive latents: higher = slower change.
    overlap : float in (0, 0.5]
        Share of a window crossfaded with each neighbour; windows start every
        ``window_frames - round(overlap · window_frames)`` frames (``hop_frames``).
    """

    def __init__(self, bundle: Bundle, *, n_iter: int = 12, momentum: float = 0.99, lookahead: int = 4,
                 rho: float = DEFAULT_RHO, inverse_iter: int = 10, overlap: float = DEFAULT_OVERLAP):
        import torch

        self.bundle = bundle
        card = bundle.card
        self.module = bundle.module
        self.labels = list(card.labels)
        self.sr, self.hop = card.sr, card.hop_length
        self.window_frames = card.window_frames
        W = self.window_frames
        if W < 4:
            raise ParameterError(f"generator window_frames must be >= 4, got {W}")
        if not 0.0 < check_range("overlap", overlap, 0.0, 0.5):
            raise ParameterError("overlap must be > 0 (windows without a crossfade would click at every seam)")
        self.overlap = max(1, int(round(overlap * W)))
        self.hop_frames = W - self.overlap
        self.latent = int(card.extra.get("latent", 0))
        if self.latent <= 0:
            raise ParameterError(f"{bundle.path}: the card does not give the latent size")
        with torch.inference_mode():
            self.emb = self.module.embeddings().detach().numpy().astype(np.float32).copy()
            if hasattr(self.module, "prior"):  # per-composer latent Gaussians, fitted when the bundle was trained
                pm, pl = self.module.prior()
                self.prior_mean = pm.numpy().astype(np.float32).copy()
                self.prior_chol = pl.numpy().astype(np.float32).copy()
            else:  # an older bundle: N(0, I) for every composer
                self.prior_mean = np.zeros((len(self.labels), self.latent), np.float32)
                self.prior_chol = np.broadcast_to(np.eye(self.latent, dtype=np.float32),
                                                  (len(self.labels), self.latent, self.latent)).copy()
        self.rho = check_range("rho", rho, 0.0, 0.999)
        ramp = np.sin(0.5 * np.pi * (np.arange(self.overlap) + 0.5) / self.overlap) ** 2
        self.fade = np.ones(W, np.float32)  # ramps up over `overlap` frames, flat, ramps down: sums to 1 at hop_frames
        self.fade[:self.overlap], self.fade[W - self.overlap:] = ramp, ramp[::-1]
        self.mel_inverse = MelInverse(card.sr, card.n_fft, card.n_mels, card.fmin, card.fmax, n_iter=inverse_iter,
                                      max_frames=self.hop_frames)
        self.phase = PhaseReconstructor(card.n_fft, card.hop_length, n_iter=n_iter, momentum=momentum,
                                        lookahead=lookahead, max_frames=self.hop_frames)
        self._torch = torch
        self._shift = None
        self.set_target(self.labels[0])
        self.start(0)

    # ---- settings --------------------------------------------------------------------------
    def composer_index(self, name) -> int:
        """Index of a composer by name (or an int index); a clear error lists the known ones."""
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            if 0 <= int(name) < len(self.labels):
                return int(name)
            raise ParameterError(f"composer index {name} is outside 0..{len(self.labels) - 1}")
        if name in self.labels:
            return self.labels.index(name)
        raise ParameterError(f"unknown composer {name!r}; this model knows: {', '.join(self.labels)}")

    def condition(self, composer_a, composer_b=None, mix: float = 0.0) -> np.ndarray:
        """The decoder's condition vector: composer A's embedding, slerped toward B's by ``mix``."""
        a = self.emb[self.composer_index(composer_a)]
        if composer_b is None or mix == 0.0:
            return a.copy()
        b = self.emb[self.composer_index(composer_b)]
        return _slerp(a, b, float(mix))

    def latent_prior(self, composer_a, composer_b=None, mix: float = 0.0):
        """Mean and Cholesky factor of the latent Gaussian: composer A's, blended linearly
        toward B's by ``mix``."""
        a = self.composer_index(composer_a)
        if composer_b is None or mix == 0.0:
            return self.prior_mean[a].copy(), self.prior_chol[a].copy()
        b, t = self.composer_index(composer_b), np.float32(mix)
        return ((1 - t) * self.prior_mean[a] + t * self.prior_mean[b],
                (1 - t) * self.prior_chol[a] + t * self.prior_chol[b])

    def set_target(self, composer_a, composer_b=None, mix: float = 0.0, temperature: float = 1.0,
                   transpose: float = 0.0) -> None:
        """Composer(s), mix toward ``composer_b`` (0..1), temperature and transposition [semitones];
        applies from the next window."""
        mix = check_range("mix", mix, 0.0, 1.0)
        temperature = check_range("temperature", temperature, 0.0, 4.0)
        transpose = check_range("transpose", transpose, -24.0, 24.0)
        self._cond = self.condition(composer_a, composer_b, mix)
        self._prior = self.latent_prior(composer_a, composer_b, mix)
        self._temperature = float(temperature)
        if transpose != getattr(self, "_transpose", 0.0):
            self._shift = None if transpose == 0.0 else _bin_map(self.phase.n_bins, 2.0 ** (transpose / 12.0))
        self._transpose = float(transpose)

    def start(self, seed: int) -> None:
        """Begin a new phrase from ``seed`` (same seed and targets → same audio)."""
        self._rng = np.random.default_rng(seed)
        self._z = self._rng.standard_normal(self.latent).astype(np.float32)
        self._tail = None
        self._first = True
        self._pending = None
        self.last_window = None
        self.phase.reset()

    # ---- steps -------------------------------------------------------------------------------
    def decode_window(self, z: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """Log-mel window [dB] (n_mels, window_frames) for a latent and a condition vector."""
        torch = self._torch
        with torch.inference_mode():
            x = self.module(torch.from_numpy(z[None]), torch.from_numpy(cond[None]))
        return x[0].numpy()

    def step_frames(self) -> np.ndarray:
        """The next ``hop_frames`` crossfaded log-mel frames [dB]."""
        mean, chol = self._prior
        x = self.decode_window(mean + self._temperature * (chol @ self._z), self._cond)
        self.last_window = x  # the decoder's own window, before the crossfade (the novelty check reads it)
        h, o = self.hop_frames, self.overlap
        frames = x[:, :h].copy()
        if self._tail is not None:
            frames[:, :o] = self._tail + self.fade[:o] * x[:, :o]
        self._tail = self.fade[h:] * x[:, h:]
        eps = self._rng.standard_normal(self.latent).astype(np.float32)
        self._z = (self.rho * self._z + np.sqrt(1.0 - self.rho ** 2) * eps).astype(np.float32)
        return frames

    def frames_to_audio(self, logmel_db: np.ndarray) -> np.ndarray:
        power = np.power(10.0, logmel_db / 10.0, dtype=np.float32)
        mag = np.sqrt(self.mel_inverse(power))
        if self._shift is not None:  # transposition: move partials along the linear frequency axis
            i0, w = self._shift
            mag = mag[i0] * (1.0 - w)[:, None] + mag[np.minimum(i0 + 1, len(i0) - 1)] * w[:, None]
        return self.phase.process(mag)

    def step(self) -> np.ndarray:
        """Decode one more window; return the audio samples that became final (float32).

        A phrase's first ``hop_frames`` are reconstructed in two parts, the first only
        ``QUICK_FRAMES`` long, so its first samples are ready sooner (note-on latency).
        """
        if self._pending is not None:
            frames, self._pending = self._pending, None
            return self.frames_to_audio(frames)
        frames = self.step_frames()
        if self._first:
            self._first = False
            q = min(QUICK_FRAMES, frames.shape[1])
            if q < frames.shape[1]:
                self._pending = frames[:, q:]
            return self.frames_to_audio(frames[:, :q])
        return self.frames_to_audio(frames)

    def finish(self) -> np.ndarray:
        """End the phrase: the remaining samples (the phase reconstructor's lookahead)."""
        if self._pending is not None:
            head, self._pending = self.frames_to_audio(self._pending), None
            return np.concatenate([head, self.phase.flush()])
        return self.phase.flush()

    def render(self, n_samples: int, progress: bool = False, sweep=None, windows: list | None = None) -> np.ndarray:
        """Exactly ``n_samples`` of audio from the current phrase and targets (offline).

        ``sweep=(composer_a, composer_b, mix_end)`` moves the mix from 0 to ``mix_end`` across
        the clip (one step per decoded window), keeping the current temperature. ``windows``, a
        list, receives every window the decoder produced, before the crossfade (log-mel [dB]).
        """
        from tqdm import tqdm

        n_samples = check_range("n_samples", n_samples, 1, None, kind=int)
        step_len = self.hop_frames * self.hop
        parts, got = [], 0
        with tqdm(total=n_samples, unit="sample", unit_scale=True, disable=None if progress else True,
                  leave=False) as bar:
            while got < n_samples:
                if sweep is not None:
                    a, b, end = sweep
                    self.set_target(a, b, float(end) * min(1.0, got / max(1, n_samples - step_len)),
                                    self._temperature, self._transpose)
                y = self.step()
                if windows is not None and self.last_window is not None and (
                        not windows or self.last_window is not windows[-1]):
                    windows.append(self.last_window)
                parts.append(y)
                got += len(y)
                bar.update(min(len(y), n_samples - (got - len(y))))
        return np.concatenate(parts)[:n_samples]


class DecodeGate:
    """Shared by generators so that one decodes at a time, and a phrase waiting for its first
    samples (a note just struck) goes before voices that only top up their buffer."""

    def __init__(self):
        self.lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.urgent = 0

    def add_urgent(self, k: int) -> None:
        with self._count_lock:
            self.urgent += k


class Generator:
    """Live composer-style audio: decodes ahead in a worker; :meth:`render` only reads a ring.

    Parameters
    ----------
    bundle : Bundle or path or None
        Generator bundle (None = the shipped one).
    ahead_s : float
        Audio decoded ahead of the reader [s].
    gate : DecodeGate or None
        Shared by several generators (the voices of ``tarab play``) so that one decodes at a
        time (fewer threads compete with the audio callback for the GIL and the cores) and new
        phrases go first.
    **synth : settings of :class:`StyleSynth`.

    Examples
    --------
    >>> g = Generator()
    >>> g.set_target("dede_efendi", "sevki_bey", mix=0.3)
    >>> with g:
    ...     g.trigger(seed=1)
    ...     block = g.render(256)   # in the audio callback: never waits
    """

    def __init__(self, bundle=None, *, ahead_s: float = 1.0, max_block: int = 8192, gate=None, **synth):
        if not isinstance(bundle, Bundle):
            bundle = load_generator(bundle)
        self.synth = StyleSynth(bundle, **synth)
        self.labels = self.synth.labels
        self.sr = self.synth.sr
        self.ahead = int(check_range("ahead_s", ahead_s, 0.05, 30.0) * self.sr)
        self._chunk = self.synth.hop_frames * self.synth.hop
        self.ring = Ring(1, self.ahead + 2 * self._chunk + max_block)
        self.max_block = check_range("max_block", max_block, 1, None, kind=int)
        self._out = np.zeros((1, self.max_block), np.float32)
        self._target = (self.labels[0], None, 0.0, 1.0, 0.0)
        self._target_seen = None
        self._trig = (0, 0)  # (request number, seed)
        self._gen = (0, 0)  # (request number the worker serves, ring position where its audio starts)
        self.underruns = 0  # samples render() had to fill with silence while playing
        self.faults = 0
        self.last_error = ""
        self.decode_seconds = 0.0
        self.decoded_samples = 0
        self._stop = threading.Event()
        self._thread = None
        self._gate = gate if gate is not None else DecodeGate()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self.set_target(self.labels[0])
        self.synth.step()  # warm the model and the kernels before any stream starts
        self.synth.start(0)

    # ---- control (any thread) ----------------------------------------------------------------
    def set_target(self, composer_a, composer_b=None, mix: float = 0.0, temperature: float = 1.0,
                   transpose: float = 0.0) -> None:
        """Validated here; the worker applies it at its next window (never blocks)."""
        self.synth.composer_index(composer_a)
        if composer_b is not None:
            self.synth.composer_index(composer_b)
        check_range("mix", mix, 0.0, 1.0)
        check_range("temperature", temperature, 0.0, 4.0)
        check_range("transpose", transpose, -24.0, 24.0)
        self._target = (composer_a, composer_b, float(mix), float(temperature), float(transpose))

    def trigger(self, seed: int | None = None) -> None:
        """Start a new phrase; audio already decoded ahead is dropped at the next :meth:`render`."""
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2 ** 31))
        self._trig = (self._trig[0] + 1, int(seed))
        self._wake.set()

    @property
    def playing(self) -> bool:
        return self._trig[0] > 0

    # ---- audio thread ------------------------------------------------------------------------
    def render(self, n_samples: int) -> np.ndarray:
        """The next ``n_samples`` (≤ ``max_block``) as a float32 view of a preallocated buffer.

        Never waits: before the first trigger, while a new phrase's first samples are decoded, or
        when the worker is behind, the missing samples are silence (the last case counted in
        :attr:`underruns`).
        """
        out = self._out[:, :n_samples]
        req = self._trig[0]
        gen_req, gen_pos = self._gen
        if req == 0 or gen_req != req:  # nothing triggered, or the new phrase has not started yet
            out[:] = 0.0
            return out[0]
        ring = self.ring
        if ring.read < gen_pos:  # drop what was decoded for the previous phrase
            ring.read = gen_pos
        got = ring.read_into(out)
        if got < n_samples:
            out[:, got:] = 0.0
            if ring.written > gen_pos:  # not the wait for a new phrase's first samples
                self.underruns += n_samples - got
        return out[0]

    # ---- worker ------------------------------------------------------------------------------
    def start(self) -> "Generator":
        if self._thread is None:
            self._stop.clear()
            self._ready.clear()
            self._thread = threading.Thread(target=self._work, name="tarab-generator", daemon=True)
            self._thread.start()
            self._ready.wait(10.0)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _work(self) -> None:
        import torch

        torch.set_num_threads(1)
        synth = self.synth
        gate = self._gate
        with gate.lock:  # this thread's first decode (torch's per-thread set-up) before any stream
            synth.decode_window(np.zeros(synth.latent, np.float32), synth.emb[0])
        self._ready.set()
        top_up = int(0.1 * self.sr)  # a voice holding this much yields to a new phrase
        while not self._stop.is_set():
            try:
                req, seed = self._trig
                if req == 0:
                    self._wake.wait(0.002)
                    self._wake.clear()
                    continue
                fresh = self._gen[0] != req
                held = self.ring.written - max(self.ring.read, self._gen[1])
                if not fresh and (held >= self.ahead or (gate.urgent > 0 and held >= top_up)):
                    self._wake.wait(0.002)
                    self._wake.clear()
                    continue
                if fresh:
                    gate.add_urgent(1)
                try:
                    with gate.lock:
                        req, seed = self._trig  # the newest request, after waiting for the lock
                        if self._gen[0] != req:
                            synth.start(seed)
                            self._target_seen = None
                            self._gen = (req, self.ring.written)
                        if self._target is not self._target_seen:
                            t = self._target
                            synth.set_target(*t)
                            self._target_seen = t
                        t0 = time.perf_counter()
                        y = synth.step()
                        self.decode_seconds += time.perf_counter() - t0
                finally:
                    if fresh:
                        gate.add_urgent(-1)
                self.decoded_samples += len(y)
                if self._trig[0] == req and len(y):  # a trigger while decoding: drop this chunk
                    self.ring.write(y[None])
            except Exception as e:  # a fault in the worker must not kill the stream
                self.faults += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("generator worker fault")
                self._stop.wait(0.05)
