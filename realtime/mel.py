"""``StreamingMel``: a streaming mel power spectrogram in numba, equal to librosa's batch one.

Each hop of new samples yields one frame: periodic Hann window → real FFT (an in-kernel
radix-2 FFT of half size plus the real-split step) → |X|² → a sparse mel filter bank (only the
non-zero run of each triangle is stored). All buffers are allocated in the constructor; the
kernels are ``@njit(cache=True, nogil=True)`` and release the GIL while they run.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.errors import ParameterError, check_range

__all__ = ["StreamingMel", "mel_filter_runs", "MAX_BLOCK_SAMPLES"]

MAX_BLOCK_SAMPLES = 8192
SR = 22050
N_FFT = 2048
HOP_LENGTH = 512
N_MELS = 128


# ---- kernels ---------------------------------------------------------------------------------
@njit(cache=True, nogil=True, fastmath=True)
def _fft_bitreversed(re, im, tw_re, tw_im):
    """Radix-2^2 decimation-in-time FFT of input already in bit-reversed order, in place.

    Pairs of radix-2 stages run as one pass over the data (one plain radix-2 stage first when
    log2(n) is odd). ``tw_re + i tw_im`` = exp(-2πi j/n), j < n/2.
    """
    n = re.shape[0]
    stages = 0
    t2 = n
    while t2 > 1:
        stages += 1
        t2 >>= 1
    h = 1
    if stages % 2 == 1:
        for s in range(0, n, 2):
            ar = re[s]
            ai = im[s]
            br = re[s + 1]
            bi = im[s + 1]
            re[s] = ar + br
            im[s] = ai + bi
            re[s + 1] = ar - br
            im[s + 1] = ai - bi
        h = 2
    if h == 1 and n >= 4:  # first merged pass: every twiddle is 1 (and -i), additions only
        for s in range(0, n, 4):
            ar = re[s] + re[s + 1]
            ai = im[s] + im[s + 1]
            br = re[s] - re[s + 1]
            bi = im[s] - im[s + 1]
            cr = re[s + 2] + re[s + 3]
            ci = im[s + 2] + im[s + 3]
            dr = re[s + 2] - re[s + 3]
            di = im[s + 2] - im[s + 3]
            re[s] = ar + cr
            im[s] = ai + ci
            re[s + 2] = ar - cr
            im[s + 2] = ai - ci
            re[s + 1] = br + di
            im[s + 1] = bi - dr
            re[s + 3] = br - di
            im[s + 3] = bi + dr
        h = 4
    while h < n:
        q = 4 * h
        s1 = n // (2 * h)  # W_{2h}^k = W_n^(k s1)
        s2 = n // q  # W_{4h}^k = W_n^(k s2)
        for k in range(h):
            w1r = tw_re[k * s1]
            w1i = tw_im[k * s1]
            w2r = tw_re[k * s2]
            w2i = tw_im[k * s2]
            for start in range(0, n, q):
                j0 = start + k
                j1 = j0 + h
                j2 = j1 + h
                j3 = j2 + h
                # first radix-2 stage (size 2h) on (j0, j1) and (j2, j3)
                tr = w1r * re[j1] - w1i * im[j1]
                ti = w1r * im[j1] + w1i * re[j1]
                ar = re[j0] + tr
                ai = im[j0] + ti
                br = re[j0] - tr
                bi = im[j0] - ti
                tr = w1r * re[j3] - w1i * im[j3]
                ti = w1r * im[j3] + w1i * re[j3]
                cr = re[j2] + tr
                ci = im[j2] + ti
                dr = re[j2] - tr
                di = im[j2] - ti
                # second stage (size 4h): twiddles W_{4h}^k and W_{4h}^(k+h) = -i W_{4h}^k
                tr = w2r * cr - w2i * ci
                ti = w2r * ci + w2i * cr
                re[j0] = ar + tr
                im[j0] = ai + ti
                re[j2] = ar - tr
                im[j2] = ai - ti
                ur = w2r * dr - w2i * di
                ui = w2r * di + w2i * dr
                re[j1] = br + ui
                im[j1] = bi - ur
                re[j3] = br - ui
                im[j3] = bi + ur
        h = q


@njit(cache=True, nogil=True, fastmath=True)
def _frame_power(ring, pos, window, re, im, bitrev, cos_t, sin_t, post_cos, post_sin, power):
    """|rfft(window * frame)|² of the ``n_fft`` samples ``ring[pos:pos + n_fft]``.

    The ring is written twice (at ``i`` and ``i + n_fft``), so every frame is contiguous.
    """
    m = window.shape[0] >> 1
    for k in range(m):  # windowed even/odd samples, stored in bit-reversed order for the FFT
        j = bitrev[k]
        re[j] = ring[pos + 2 * k] * window[2 * k]
        im[j] = ring[pos + 2 * k + 1] * window[2 * k + 1]
    _fft_bitreversed(re, im, cos_t, sin_t)
    for k in range(m + 1):
        k1 = k if k < m else 0
        k2 = (m - k) if k > 0 else 0
        zr, zi = re[k1], im[k1]
        cr, ci = re[k2], -im[k2]  # conj(Z[m-k])
        er = 0.5 * (zr + cr)
        ei = 0.5 * (zi + ci)
        # (Z - conj) / (2i)
        orr = 0.5 * (zi - ci)
        oi = -0.5 * (zr - cr)
        wr = post_cos[k]
        wi = -post_sin[k]
        xr = er + wr * orr - wi * oi
        xi = ei + wr * oi + wi * orr
        power[k] = xr * xr + xi * xi


@njit(cache=True, nogil=True, fastmath=True)
def _mel_frame(power, lo, hi, off, w, out, col):
    for b in range(lo.shape[0]):
        s = 0.0
        o = off[b] - lo[b]
        for j in range(lo[b], hi[b]):
            s += w[o + j] * power[j]
        out[b, col] = s


# Layout of the two state arrays handed to the kernel. Fewer arguments keep numba's per-call
# dispatch cheap (it unboxes every array argument), which matters at one call per audio block.
# int64 header: stream state, then offsets of the float64 and int64 tables.
H_POS, H_NXT, H_HOP, H_USED = 0, 1, 2, 3
H_F = 4  # H_F + j: start of float table j (j = 0..10, the last is the end)
F_RING, F_WIN, F_RE, F_IM, F_COS, F_SIN, F_PCOS, F_PSIN, F_POW, F_W = range(10)
H_I = H_F + 11  # H_I + j: start of int table j (j = 0..4)
I_BITREV, I_LO, I_HI, I_OFF = range(4)
HEADER = H_I + 5


@njit(cache=True, nogil=True)
def _mel_stream(x, f, ii, out):
    """Push samples ``x``; write each completed frame into ``out[:, k]``; return k.

    ``f`` holds the float64 tables and work buffers, ``ii`` the stream state and int tables
    (layout: the H_/F_/I_ constants). Stops early, with the state consistent, if ``out`` is full.
    """
    ring = f[ii[H_F + F_RING]:ii[H_F + F_RING + 1]]
    window = f[ii[H_F + F_WIN]:ii[H_F + F_WIN + 1]]
    re = f[ii[H_F + F_RE]:ii[H_F + F_RE + 1]]
    im = f[ii[H_F + F_IM]:ii[H_F + F_IM + 1]]
    cos_t = f[ii[H_F + F_COS]:ii[H_F + F_COS + 1]]
    sin_t = f[ii[H_F + F_SIN]:ii[H_F + F_SIN + 1]]
    post_cos = f[ii[H_F + F_PCOS]:ii[H_F + F_PCOS + 1]]
    post_sin = f[ii[H_F + F_PSIN]:ii[H_F + F_PSIN + 1]]
    power = f[ii[H_F + F_POW]:ii[H_F + F_POW + 1]]
    w = f[ii[H_F + F_W]:ii[H_F + F_W + 1]]
    bitrev = ii[ii[H_I + I_BITREV]:ii[H_I + I_BITREV + 1]]
    lo = ii[ii[H_I + I_LO]:ii[H_I + I_LO + 1]]
    hi = ii[ii[H_I + I_HI]:ii[H_I + I_HI + 1]]
    off = ii[ii[H_I + I_OFF]:ii[H_I + I_OFF + 1]]
    n_fft = ring.shape[0] >> 1
    pos = ii[H_POS]
    nxt = ii[H_NXT]
    hop = ii[H_HOP]
    k = 0
    cap = out.shape[1]
    i = 0
    n = x.shape[0]
    while i < n:
        ring[pos] = x[i]
        ring[pos + n_fft] = x[i]
        pos += 1
        if pos == n_fft:
            pos = 0
        nxt -= 1
        i += 1
        if nxt == 0:
            _frame_power(ring, pos, window, re, im, bitrev, cos_t, sin_t, post_cos, post_sin, power)
            _mel_frame(power, lo, hi, off, w, out, k)
            k += 1
            nxt = hop
            if k == cap:
                break
    ii[H_POS] = pos
    ii[H_NXT] = nxt
    ii[H_USED] = i  # samples consumed
    return k


def _pack(tables, dtype, header=0):
    """Concatenate ``tables`` after ``header`` slots; return (array, start offsets incl. the end)."""
    starts = [header]
    for t in tables:
        starts.append(starts[-1] + len(t))
    arr = np.zeros(starts[-1], dtype)
    for t, a in zip(tables, starts):
        arr[a:a + len(t)] = t
    return arr, starts


# ---- filter bank -----------------------------------------------------------------------------
def mel_filter_runs(sr, n_fft, n_mels, fmin, fmax):
    """librosa's mel filter bank (Slaney, float32 values) as runs of non-zero weights.

    Returns
    -------
    lo, hi : np.ndarray [shape=(n_mels,)], int64
        First and one-past-last FFT bin of each band.
    off : np.ndarray [shape=(n_mels,)], int64
        Offset of each band's weights in ``w``.
    w : np.ndarray, float64
        Concatenated weights.
    """
    import librosa

    basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float64)
    lo = np.zeros(n_mels, np.int64)
    hi = np.zeros(n_mels, np.int64)
    off = np.zeros(n_mels, np.int64)
    ws = []
    o = 0
    for b in range(n_mels):
        nz = np.flatnonzero(basis[b])
        if nz.size:
            lo[b], hi[b] = nz[0], nz[-1] + 1
        ws.append(basis[b, lo[b]:hi[b]])
        off[b] = o
        o += hi[b] - lo[b]
    return lo, hi, off, np.concatenate(ws) if ws else np.zeros(0)


# ---- public class ----------------------------------------------------------------------------
class StreamingMel:
    """Mel power spectrogram of a stream, frame for frame equal to librosa's ``center=False`` one.

    Parameters
    ----------
    sr : number > 0
        Sample rate [Hz].
    n_fft : int, power of two in [64, 16384]
        FFT size = window length [samples].
    hop_length : int in [1, n_fft]
        Samples between frames.
    n_mels : int > 0
        Mel bands.
    fmin : float >= 0
        Lowest band edge [Hz].
    fmax : float or None
        Highest band edge [Hz]; None means ``sr / 2``.

    Notes
    -----
    ``process`` is real-time safe for blocks up to 8192 samples: it runs numba kernels on
    preallocated buffers and returns a view of an internal buffer (copy it, or pass ``out``).
    The first frame completes after ``n_fft`` samples, then one per ``hop_length`` samples, so
    frame ``t`` covers samples ``[t * hop_length, t * hop_length + n_fft)`` of the stream.

    Examples
    --------
    >>> import numpy as np
    >>> sm = StreamingMel(sr=22050, n_fft=2048, hop_length=512, n_mels=128)
    >>> y = np.sin(2 * np.pi * 440 * np.arange(22050) / 22050).astype(np.float32)
    >>> frames = [sm.process(y[i:i + 1000]).copy() for i in range(0, y.size, 1000)]
    >>> S = np.concatenate(frames, axis=1)
    >>> S.shape  # 1 + (22050 - 2048) // 512 frames
    (128, 40)
    >>> import librosa
    >>> ref = librosa.feature.melspectrogram(y=y.astype(np.float64), sr=22050, center=False)
    >>> bool(np.allclose(S, ref, rtol=1e-4, atol=1e-6))
    True
    """

    def __init__(self, sr: float = SR, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
                 n_mels: int = N_MELS, fmin: float = 0.0, fmax: float | None = None):
        self.sr = check_range("sr", sr, 1, None, kind=int)
        self.n_fft = check_range("n_fft", n_fft, 64, 16384, kind=int)
        if self.n_fft & (self.n_fft - 1):
            raise ParameterError(f"n_fft: {n_fft} is not a power of two")
        self.hop_length = check_range("hop_length", hop_length, 1, self.n_fft, kind=int)
        self.n_mels = check_range("n_mels", n_mels, 1, 512, kind=int)
        self.fmin = check_range("fmin", fmin, 0.0, self.sr / 2)
        self.fmax = None if fmax is None else check_range("fmax", fmax, self.fmin, self.sr / 2)
        import scipy.signal

        window = scipy.signal.get_window("hann", self.n_fft, fftbins=True).astype(np.float64)
        m = self.n_fft // 2
        bits = m.bit_length() - 1
        bitrev = np.array([int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(m)], np.int64)
        j = np.arange(max(1, m // 2))
        lo, hi, off, w = mel_filter_runs(self.sr, self.n_fft, self.n_mels, self.fmin, self.fmax)
        f_tables = [np.zeros(2 * self.n_fft),  # ring: each sample at i and i + n_fft
                    window, np.zeros(m), np.zeros(m),  # window, FFT work (re, im)
                    np.cos(2 * np.pi * j / m), -np.sin(2 * np.pi * j / m),  # FFT twiddles W_m^j
                    np.cos(2 * np.pi * np.arange(m + 1) / self.n_fft),  # real-split twiddles
                    np.sin(2 * np.pi * np.arange(m + 1) / self.n_fft),
                    np.zeros(m + 1), w]  # power spectrum, mel weights
        self._f, fs = _pack(f_tables, np.float64)
        self._ii, is_ = _pack([bitrev, lo, hi, off], np.int64, header=HEADER)
        self._ii[H_F:H_F + len(fs)] = fs
        self._ii[H_I:H_I + len(is_)] = is_
        self._ring = self._f[fs[F_RING]:fs[F_RING + 1]]
        self._window = self._f[fs[F_WIN]:fs[F_WIN + 1]]
        self._w = self._f[fs[F_W]:fs[F_W + 1]]
        self.max_frames = MAX_BLOCK_SAMPLES // self.hop_length + 1
        self._out = np.zeros((self.n_mels, self.max_frames), np.float32)
        self.reset()
        self.process(np.zeros(1, np.float32))  # compile (or load cached) kernels now
        self.reset()

    @property
    def latency_samples(self) -> int:
        """Window length [samples]: a frame completes ``n_fft`` samples after its first sample."""
        return self.n_fft

    @property
    def config(self) -> dict:
        """The mel parameters in librosa names (for bundle cards)."""
        return {"sr": self.sr, "n_fft": self.n_fft, "hop_length": self.hop_length, "n_mels": self.n_mels,
                "fmin": self.fmin, "fmax": self.fmax}

    def reset(self) -> None:
        """Start a new stream: the next frame completes after ``n_fft`` new samples."""
        self._ring[:] = 0.0
        self._ii[H_POS] = 0
        self._ii[H_NXT] = self.n_fft
        self._ii[H_HOP] = self.hop_length
        self.frames_out = 0

    def process(self, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Push a block of samples; return the frames it completed.

        Parameters
        ----------
        block : np.ndarray [shape=(n,)], float32
            Mono samples, any length (up to 8192 without allocation).
        out : np.ndarray [shape=(n_mels, >= k)], float32, optional
            Where to write the frames.

        Returns
        -------
        S : np.ndarray [shape=(n_mels, k)], float32
            Mel power frames completed by this block (k >= 0). Without ``out`` this is a view of
            an internal buffer, overwritten by the next call.
        """
        dst = self._out if out is None else out
        k = _mel_stream(block, self._f, self._ii, dst)
        consumed = int(self._ii[H_USED])
        if consumed < block.shape[0]:  # a block longer than `out` holds: grow (offline use only)
            rest = self.process(block[consumed:])
            res = np.concatenate([dst[:, :k], rest], axis=1)
            self.frames_out += k
            return res
        self.frames_out += k
        return dst[:, :k]

    __call__ = process

    def n_frames(self, n_samples: int) -> int:
        """Frames a fresh stream of ``n_samples`` samples yields (librosa ``center=False``)."""
        return 0 if n_samples < self.n_fft else 1 + (n_samples - self.n_fft) // self.hop_length

    def transform(self, y: np.ndarray) -> np.ndarray:
        """Mel power spectrogram of a whole signal, through the streaming path (resets first).

        Parameters
        ----------
        y : np.ndarray [shape=(n,)]

        Returns
        -------
        S : np.ndarray [shape=(n_mels, t)], float32, ``t = n_frames(n)``.
        """
        self.reset()
        y = np.ascontiguousarray(y, np.float32)
        S = np.zeros((self.n_mels, self.n_frames(y.size)), np.float32)
        t = 0
        for i in range(0, y.size, MAX_BLOCK_SAMPLES):
            k = self.process(y[i:i + MAX_BLOCK_SAMPLES], out=self._out).shape[1]
            S[:, t:t + k] = self._out[:, :k]
            t += k
        self.reset()
        return S
