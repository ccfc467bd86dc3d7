"""Streaming phase reconstruction in numba: block-online fast Griffin-Lim (momentum).

:class:`PhaseReconstructor` turns magnitude frames (``n_fft // 2 + 1`` bins, hop ``hop_length``,
periodic Hann window, ``center=False`` framing as in :class:`~realtime.mel.StreamingMel`) into
audio, a chunk of frames at a time:

- New frames start from the previous frame's phase advanced by ``2π k hop / n_fft`` (what a
  stationary partial at bin ``k`` does), the first frame from zero phase.
- Each call runs ``n_iter`` iterations of fast Griffin-Lim (Perraudin, Balazs & Søndergaard 2013:
  projection onto the magnitudes, then ``c = p + α (p − p_prev)``) over the frames not yet
  committed: the last ``lookahead`` frames of the previous call and the new ones. Frames already
  committed stay fixed and enter only through their overlap with the active region, so the
  stream has no seams at chunk boundaries.
- All but the last ``lookahead`` frames are then committed; the samples no active frame touches
  any more are returned (least-squares overlap-add: Σ w·x / Σ w²).

The FFT is the radix-2² kernel of :mod:`realtime.mel`, one complex FFT per *pair* of real
frames (packing two real signals into the real and imaginary parts). All buffers are allocated
in the constructor for up to ``max_frames`` frames per call; the kernels release the GIL.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.errors import ParameterError, check_range

from .mel import _fft_bitreversed, bit_reversal, fft_twiddles

__all__ = ["PhaseReconstructor", "spectral_convergence", "stft_magnitude"]


@njit(cache=True, nogil=True, fastmath=True)
def _synth_pair(cre, cim, t0, t1, window, bitrev, tw, wre, wim, sig, pos0, pos1, hop):
    """sig[t*hop : t*hop + n] += window * irfft(C_t) for frames t0 and t1 (t1 < 0: none)."""
    n = window.shape[0]
    m = n // 2
    # Y = A + iB over the full circle (Hermitian halves mirrored); fft(conj(Y)), then conj / n,
    # gives ifft(Y) = a + ib: the two real frames at once
    if t1 >= 0:
        for k in range(m + 1):
            j = bitrev[k]
            wre[j] = cre[t0, k] - cim[t1, k]
            wim[j] = -(cim[t0, k] + cre[t1, k])
        for k in range(m + 1, n):
            kk = n - k
            j = bitrev[k]
            wre[j] = cre[t0, kk] + cim[t1, kk]
            wim[j] = cim[t0, kk] - cre[t1, kk]
    else:
        for k in range(m + 1):
            j = bitrev[k]
            wre[j] = cre[t0, k]
            wim[j] = -cim[t0, k]
        for k in range(m + 1, n):
            kk = n - k
            j = bitrev[k]
            wre[j] = cre[t0, kk]
            wim[j] = cim[t0, kk]
    _fft_bitreversed(wre, wim, tw)
    inv = 1.0 / n
    for i in range(n):
        sig[pos0 + i] += window[i] * wre[i] * inv
    if t1 >= 0:
        for i in range(n):
            sig[pos1 + i] -= window[i] * wim[i] * inv


@njit(cache=True, nogil=True, fastmath=True)
def _analyse_project_pair(y, pos0, pos1, t0, t1, window, bitrev, tw, wre, wim, mag, cre, cim,
                          pre, pim, alpha):
    """X = rfft(window * y[pos:pos+n]); P = |S| X/|X|; C = P + α (P − P_prev); P_prev = P."""
    n = window.shape[0]
    m = n // 2
    for i in range(n):
        j = bitrev[i]
        wre[j] = window[i] * y[pos0 + i]
        wim[j] = window[i] * y[pos1 + i] if t1 >= 0 else 0.0
    _fft_bitreversed(wre, wim, tw)
    for q in range(2):
        t = t0 if q == 0 else t1
        if t < 0:
            break
        for k in range(m + 1):
            kk = n - k if k > 0 else 0
            zr = wre[k]
            zi = wim[k]
            cr = wre[kk]
            ci = -wim[kk]
            if q == 0:  # A = (Z + conj Z[n-k]) / 2
                xr = 0.5 * (zr + cr)
                xi = 0.5 * (zi + ci)
            else:  # B = (Z - conj Z[n-k]) / (2i)
                xr = 0.5 * (zi - ci)
                xi = -0.5 * (zr - cr)
            a2 = xr * xr + xi * xi
            s = mag[t, k]
            if a2 > 1e-24:
                g = s / np.sqrt(a2)
                pr = g * xr
                pi = g * xi
            else:
                pr = s
                pi = 0.0
            cre[t, k] = pr + alpha * (pr - pre[t, k])
            cim[t, k] = pi + alpha * (pi - pim[t, k])
            pre[t, k] = pr
            pim[t, k] = pi


@njit(cache=True, nogil=True, fastmath=True)
def _synthesise(cre, cim, n_frames, window, bitrev, tw, wre, wim, sig, hop):
    for t in range(0, n_frames, 2):
        t1 = t + 1 if t + 1 < n_frames else -1
        _synth_pair(cre, cim, t, t1, window, bitrev, tw, wre, wim, sig, t * hop, (t + 1) * hop, hop)


@njit(cache=True, nogil=True, fastmath=True)
def _fgla(mag, cre, cim, pre, pim, n_frames, n_iter, alpha, tail, tail_w2, w2, window, bitrev, tw,
          wre, wim, sig, y, hop):
    """``n_iter`` fast Griffin-Lim iterations over active frames ``0..n_frames-1``.

    ``w2`` holds the *inverse* of the summed squared windows over the active region.
    """
    n = window.shape[0]
    r = (n_frames - 1) * hop + n
    nt = tail.shape[0]
    for _ in range(n_iter):
        for i in range(r):
            sig[i] = 0.0
        for i in range(nt):
            sig[i] += tail[i]
        _synthesise(cre, cim, n_frames, window, bitrev, tw, wre, wim, sig, hop)
        for i in range(r):
            y[i] = sig[i] * w2[i]
        for t in range(0, n_frames, 2):
            t1 = t + 1 if t + 1 < n_frames else -1
            _analyse_project_pair(y, t * hop, (t + 1) * hop, t, t1, window, bitrev, tw, wre, wim, mag,
                                  cre, cim, pre, pim, alpha)


class PhaseReconstructor:
    """Block-online fast Griffin-Lim: magnitude frames in, audio out.

    Parameters
    ----------
    n_fft : int, power of two
    hop_length : int, divides ``n_fft``
    n_iter : int
        Fast Griffin-Lim iterations per call (each active frame sees ``n_iter`` per call it is
        active in).
    momentum : float in [0, 1)
        α of fast Griffin-Lim (0 = plain Griffin-Lim; librosa's default is 0.99).
    lookahead : int
        Frames kept active (uncommitted) after each call. Latency in frames.
    max_frames : int
        Largest number of frames per :meth:`process` call.

    Examples
    --------
    >>> pr = PhaseReconstructor(n_fft=2048, hop_length=512)
    >>> y = np.concatenate([pr.process(S[:, i:i + 32]) for i in range(0, S.shape[1], 32)] + [pr.flush()])
    """

    def __init__(self, n_fft: int = 2048, hop_length: int = 512, n_iter: int = 12, momentum: float = 0.99,
                 lookahead: int = 4, max_frames: int = 64):
        self.n_fft = check_range("n_fft", n_fft, 64, 16384, kind=int)
        if n_fft & (n_fft - 1):
            raise ParameterError(f"n_fft: {n_fft} is not a power of two")
        self.hop_length = check_range("hop_length", hop_length, 1, n_fft, kind=int)
        if n_fft % hop_length:
            raise ParameterError(f"hop_length {hop_length} must divide n_fft {n_fft}")
        self.n_iter = check_range("n_iter", n_iter, 0, 1000, kind=int)
        self.momentum = check_range("momentum", momentum, 0.0, 0.999)
        self.lookahead = check_range("lookahead", lookahead, 0, 64, kind=int)
        self.max_frames = check_range("max_frames", max_frames, 1, 4096, kind=int)
        import scipy.signal

        n, hop = self.n_fft, self.hop_length
        self.n_bins = n // 2 + 1
        self.window = scipy.signal.get_window("hann", n, fftbins=True).astype(np.float64)
        self._bitrev = bit_reversal(n)
        self._tw = fft_twiddles(n)
        F = self.max_frames + self.lookahead
        self._mag = np.zeros((F, self.n_bins))
        self._cre, self._cim = np.zeros((F, self.n_bins)), np.zeros((F, self.n_bins))
        self._pre, self._pim = np.zeros((F, self.n_bins)), np.zeros((F, self.n_bins))
        R = (F - 1) * hop + n
        self._sig, self._y, self._w2 = np.zeros(R), np.zeros(R), np.zeros(R)
        self._wre, self._wim = np.zeros(n), np.zeros(n)
        self._tail, self._tail_w2 = np.zeros(n - hop), np.zeros(n - hop)
        adv = 2 * np.pi * np.arange(self.n_bins) * hop / n
        steps = np.arange(self.max_frames + 1)[:, None]
        self._rot_c, self._rot_s = np.cos(steps * adv), np.sin(steps * adv)
        self.reset()
        self.process(np.ones((self.n_bins, 1)))  # compile (or load cached) kernels now
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self._n_active = 0
        self._frames_seen = 0
        self._tail[:] = 0.0
        self._tail_w2[:] = 0.0
        self._last_phase = None

    @property
    def latency_samples(self) -> int:
        """Samples between a frame's start and the moment it is output (lookahead + window)."""
        return self.lookahead * self.hop_length + self.n_fft - self.hop_length

    def process(self, mag: np.ndarray) -> np.ndarray:
        """Add magnitude frames (n_bins, k); return the audio samples that are now final (float32)."""
        mag = np.asarray(mag, np.float64)
        if mag.ndim != 2 or mag.shape[0] != self.n_bins:
            raise ParameterError(f"magnitudes must have shape ({self.n_bins}, k), got {mag.shape}")
        k = mag.shape[1]
        if k > self.max_frames:
            return np.concatenate([self.process(mag[:, a:a + self.max_frames]) for a in range(0, k, self.max_frames)])
        if k == 0:
            return np.zeros(0, np.float32)
        if not np.all(np.isfinite(mag)):
            raise ParameterError("magnitudes contain NaN or Inf")
        a0 = self._n_active
        nf = a0 + k
        self._frames_seen += k
        self._mag[a0:nf] = mag.T
        # phase-advance initialisation: frame j after the last known phase gets + j·advance
        # (rotations from precomputed tables: no trigonometry per call)
        m = self._mag[a0:nf]
        if self._last_phase is None:
            self._cre[a0:nf] = m * self._rot_c[:k]
            self._cim[a0:nf] = m * self._rot_s[:k]
        else:
            lc, ls = self._last_phase
            rc, rs = self._rot_c[1:k + 1], self._rot_s[1:k + 1]
            self._cre[a0:nf] = m * (lc * rc - ls * rs)
            self._cim[a0:nf] = m * (lc * rs + ls * rc)
        self._pre[a0:nf] = self._cre[a0:nf]
        self._pim[a0:nf] = self._cim[a0:nf]
        return self._run(nf, commit=max(0, nf - self.lookahead))

    def flush(self) -> np.ndarray:
        """Commit every active frame and return the rest of the signal; then :meth:`reset`."""
        nf = self._n_active
        out = self._run(nf, commit=nf) if nf else np.zeros(0, np.float32)
        if self._frames_seen:  # the last frames' samples that no later frame overlaps
            tail = self._tail / np.maximum(self._tail_w2, 1e-3 * self._w2_peak)
            out = np.concatenate([out, tail.astype(np.float32)])
        self.reset()
        return out

    def _run(self, nf: int, commit: int) -> np.ndarray:
        n, hop = self.n_fft, self.hop_length
        r = (nf - 1) * hop + n
        w2 = self._w2
        w2[:r] = 0.0
        w2[: n - hop] += self._tail_w2
        ww = self.window ** 2
        for t in range(nf):
            w2[t * hop:t * hop + n] += ww
        self._w2_peak = float(ww.reshape(-1, hop).sum(0).max())
        np.maximum(w2[:r], 1e-3 * self._w2_peak, out=w2[:r])
        np.divide(1.0, w2[:r], out=w2[:r])  # the kernel multiplies
        if self.n_iter:
            _fgla(self._mag, self._cre, self._cim, self._pre, self._pim, nf, self.n_iter, self.momentum, self._tail,
                  self._tail_w2, w2, self.window, self._bitrev, self._tw, self._wre, self._wim,
                  self._sig, self._y, hop)
        last = nf - 1
        a = np.hypot(self._cre[last], self._cim[last])
        nz = a > 1e-12
        lc = np.where(nz, self._cre[last] / np.where(nz, a, 1.0), 1.0)
        ls = np.where(nz, self._cim[last] / np.where(nz, a, 1.0), 0.0)
        self._last_phase = (lc, ls)  # unit phasor of the last active frame
        # commit the first `commit` frames: their synthesis joins the tail
        sig = self._sig
        rc = (commit - 1) * hop + n if commit else 0
        sig[:max(rc, n - hop)] = 0.0
        sig[: n - hop] += self._tail
        if commit:
            _synthesise(self._cre, self._cim, commit, self.window, self._bitrev, self._tw, self._wre,
                        self._wim, sig, hop)
        cw2 = np.zeros(max(rc, n - hop))
        cw2[: n - hop] += self._tail_w2
        for t in range(commit):
            cw2[t * hop:t * hop + n] += ww
        done = commit * hop
        out = sig[:done] / np.maximum(cw2[:done], 1e-3 * self._w2_peak)
        self._tail[:] = sig[done:done + n - hop]
        self._tail_w2[:] = cw2[done:done + n - hop]
        keep = nf - commit
        for arr in (self._mag, self._cre, self._cim, self._pre, self._pim):
            arr[:keep] = arr[commit:nf]
        self._n_active = keep
        return out.astype(np.float32)


def stft_magnitude(y: np.ndarray, n_fft: int = 2048, hop_length: int = 512) -> np.ndarray:
    """|STFT| with the framing tarab uses everywhere (periodic Hann, ``center=False``)."""
    import librosa

    return np.abs(librosa.stft(np.asarray(y, np.float32), n_fft=n_fft, hop_length=hop_length, center=False))


def spectral_convergence(target: np.ndarray, estimate: np.ndarray) -> float:
    """‖|S| − |Ŝ|‖_F / ‖|S|‖_F over the common frames (lower is better; 0 = equal)."""
    t = min(target.shape[1], estimate.shape[1])
    a, b = target[:, :t], estimate[:, :t]
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
