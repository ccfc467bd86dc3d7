"""``tarab evaluate-generation``: does the generator make new music in the requested style?

Every figure is computed from audio: generated clips go through the whole decoder (latent →
log-mel → magnitude → fast Griffin-Lim) and are re-analysed with the live ``StreamingMel``.

- **Style accuracy**: ``clips`` clips per composer (seeds 0..clips-1), classified by the shipped
  classifier (mean of its window probabilities; the classifier was never used in training).
- **Realism**: Fréchet distance between Gaussian fits of (a) log-mel frames and (b) the
  classifier's penultimate embeddings of windows, generated vs held-out test pieces, next to the
  same distance between two disjoint halves (by piece) of the held-out pieces.
- **Reconstruction**: spectral convergence of encode → decode of held-out windows (mel magnitude),
  of the phase reconstruction alone (|STFT| of held-out audio → audio → |STFT|) and of the whole
  chain (held-out window → encode → decode → audio).
- **Novelty**: for each generated window, the cosine similarity (of per-band mean-centred
  log-mel) to its nearest training window; compared with the 99th percentile of what held-out
  windows reach against training windows of the *same* composer (different pieces). Checked
  twice: on windows of the re-analysed audio, and on every window the decoder produced, before
  the crossfade (a crossfade of two copied windows can look new; a decoded window cannot hide).
- **Morph**: P(B) from the classifier for mix 0, .25, .5, .75, 1 between composer pairs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from models.data import FeatureCache, WindowSet, log_mel, scan_dataset
from models.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["evaluate_generation", "print_report", "frechet", "DEFAULT_CORPUS"]

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "symbtr8"
MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two sets of row vectors.

    tr sqrt(C1 C2) is taken as the sum of the square roots of the eigenvalues of the symmetric
    C1^1/2 C2 C1^1/2: equal to ``scipy.linalg.sqrtm``'s trace, but stable (and silent) when a
    covariance is singular, as it is for always-silent mel bands or dead embedding units.
    """
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(c1)
    s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(s1 @ c2 @ s1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_covmean)


class _Judge:
    """The classifier bundle applied to mel power: window probabilities and embeddings."""

    def __init__(self, bundle):
        import torch

        self.module, self.card, self.torch = bundle.module, bundle.card, torch
        self.labels = list(bundle.card.labels)
        self.W = bundle.card.window_frames
        self.hop = max(1, round(bundle.card.sr / bundle.card.hop_length / 4))  # the live 4 Hz estimates

    def windows(self, mel_power: np.ndarray) -> np.ndarray:
        T = mel_power.shape[1]
        starts = range(0, max(1, T - self.W + 1), self.hop)
        ws = []
        for s in starts:
            w = mel_power[:, s:s + self.W]
            if w.shape[1] < self.W:
                w = np.pad(w, ((0, 0), (0, self.W - w.shape[1])))
            ws.append(w)
        return np.stack(ws).astype(np.float32)

    def probs(self, mel_power: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.module(self.torch.from_numpy(self.windows(mel_power))).numpy()

    def embed(self, mel_power: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.module.embed(self.torch.from_numpy(self.windows(mel_power))).numpy()


def _centred_windows(logmel_db: np.ndarray, frames: int, hop: int, mean: np.ndarray) -> np.ndarray:
    T = logmel_db.shape[1]
    if T < frames:
        return np.zeros((0, logmel_db.shape[0] * frames), np.float32)
    ws = np.stack([logmel_db[:, s:s + frames] for s in range(0, T - frames + 1, hop)]) - mean[None, :, None]
    ws = ws.reshape(len(ws), -1).astype(np.float32)
    return ws / np.maximum(np.linalg.norm(ws, axis=1, keepdims=True), 1e-6)


def _max_cos(q: np.ndarray, ref: np.ndarray, chunk: int = 2048) -> np.ndarray:
    best = np.full(len(q), -1.0, np.float32)
    for a in range(0, len(ref), chunk):
        best = np.maximum(best, (q @ ref[a:a + chunk].T).max(axis=1))
    return best


def evaluate_generation(data_dir=None, *, generator=None, classifier=None, clips: int = 10, seconds: float = 10.0,
                        cache_dir=None, plots=None, progress: bool = True, pairs=None) -> dict:
    """All figures of the generation issue, as a JSON-serialisable dict (see the module doc)."""
    import torch
    from tqdm import tqdm

    from .classify import load_classifier
    from .generate import StyleSynth, load_generator
    from .mel import StreamingMel
    from .phase import PhaseReconstructor, spectral_convergence, stft_magnitude

    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_CORPUS
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data set (give the corpus folder)")
    gb = load_generator(generator)
    judge = _Judge(load_classifier(classifier))
    synth = StyleSynth(gb)
    card = gb.card
    sm = StreamingMel(card.sr, card.n_fft, card.hop_length, card.n_mels, card.fmin, card.fmax)
    if list(judge.labels) != list(synth.labels):
        raise DataError("the generator and the classifier know different composers")
    labels = synth.labels
    split_file = Path(gb.path) / "split.json"
    if not split_file.is_file():
        raise DataError(f"{gb.path}: no split.json (needed to know the held-out pieces)")
    split = json.loads(split_file.read_text())
    items = scan_dataset(data_dir)
    cache = FeatureCache(data_dir, cache_dir or Path.home() / ".cache" / "tarab" / "features", sm.transform, sm.config)
    feats, _ = cache.load_all(items, progress=progress)
    test_items = [it for it in items if it.piece in set(split["test"]) and it.path in feats]
    train_items = [it for it in items if it.piece in set(split["train"]) and it.path in feats]
    n = int(round(seconds * card.sr))
    W = card.window_frames
    torch.set_num_threads(1)

    # -- generated clips, re-analysed ------------------------------------------------------------
    gen_mel, decoded = {}, {}
    style_hits, style_table = 0, {}
    bar = tqdm(total=len(labels) * clips, desc="generate", unit="clip", disable=None if progress else True, leave=False)
    for ci, lab in enumerate(labels):
        hits = 0
        for s in range(clips):
            synth.set_target(lab)
            synth.start(s)
            wins = []
            y = synth.render(n, windows=wins)
            S = sm.transform(y)
            sm.reset()
            gen_mel[(lab, s)] = S
            decoded[(lab, s)] = wins
            hits += int(np.argmax(judge.probs(S).mean(0)) == ci)
            bar.update()
        style_table[lab] = hits / clips
        style_hits += hits
    bar.close()
    style_acc = style_hits / (clips * len(labels))

    # -- the judge on real held-out audio of the same length (the ceiling style accuracy can reach)
    real_hits, real_n = 0, 0
    clip_frames = max(W, int(seconds * card.sr / card.hop_length))
    for it in test_items:
        X = feats[it.path]
        for a in range(0, X.shape[1] - clip_frames + 1, clip_frames)[:2]:
            S = np.power(10.0, X[:, a:a + clip_frames].astype(np.float32) / 10.0)
            real_hits += int(np.argmax(judge.probs(S).mean(0)) == labels.index(it.label))
            real_n += 1
    real_acc = real_hits / max(1, real_n)

    # -- realism -------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    pieces = sorted({it.piece for it in test_items})
    rng.shuffle(pieces)
    half_a = set(pieces[: len(pieces) // 2])
    real_mel = {it.path: np.power(10.0, feats[it.path].astype(np.float32) / 10.0) for it in test_items}
    # the cached features are already log-mel [dB]: frames straight from them, each half once
    frames_a = np.concatenate([feats[it.path].astype(np.float32).T for it in test_items if it.piece in half_a])
    frames_b = np.concatenate([feats[it.path].astype(np.float32).T for it in test_items if it.piece not in half_a])
    frames_real = np.concatenate([frames_a, frames_b])
    frames_gen = np.concatenate([log_mel(S).T for S in gen_mel.values()])
    emb_real_a = np.concatenate([judge.embed(real_mel[it.path]) for it in test_items if it.piece in half_a])
    emb_real_b = np.concatenate([judge.embed(real_mel[it.path]) for it in test_items if it.piece not in half_a])
    emb_real = np.concatenate([emb_real_a, emb_real_b])
    emb_gen = np.concatenate([judge.embed(S) for S in gen_mel.values()])
    realism = {
        "logmel_frames": {"generated_vs_real": frechet(frames_gen, frames_real), "real_vs_real": frechet(frames_a, frames_b)},
        "classifier_embeddings": {"generated_vs_real": frechet(emb_gen, emb_real),
                                  "real_vs_real": frechet(emb_real_a, emb_real_b)},
        "n_frames": {"generated": len(frames_gen), "real": len(frames_real)},
        "n_windows": {"generated": len(emb_gen), "real": len(emb_real)},
    }
    for v in (realism["logmel_frames"], realism["classifier_embeddings"]):
        v["ratio"] = v["generated_vs_real"] / max(v["real_vs_real"], 1e-9)

    # -- reconstruction ---------------------------------------------------------------------------
    wtest = WindowSet(test_items, feats, labels, W, W * 4)
    pick = rng.choice(len(wtest), min(len(wtest), 48), replace=False)
    X = np.stack([wtest.window(int(j)) for j in pick])
    with torch.inference_mode():
        mu = synth.module.encode(torch.from_numpy(X))
        cond = torch.from_numpy(synth.emb[wtest.y[pick]])
        Xh = synth.module(mu, cond).numpy()
    mag_t, mag_h = np.power(10.0, X / 20.0), np.power(10.0, Xh / 20.0)
    sc_vae = float(np.mean([spectral_convergence(a, b) for a, b in zip(mag_t, mag_h)]))
    # phase reconstruction alone, and the whole chain, on held-out audio
    from models.data import load_audio

    pr = PhaseReconstructor(card.n_fft, card.hop_length, n_iter=synth.phase.n_iter, momentum=synth.phase.momentum,
                            lookahead=synth.phase.lookahead, max_frames=synth.hop_frames)
    sc_phase, sc_chain = [], []
    for it in test_items[:: max(1, len(test_items) // 8)][:8]:
        y = load_audio(data_dir / it.path, card.sr)[: 10 * card.sr]
        M = stft_magnitude(y, card.n_fft, card.hop_length)
        yh = np.concatenate([pr.process(M[:, a:a + synth.hop_frames]) for a in range(0, M.shape[1], synth.hop_frames)]
                            + [pr.flush()])
        sc_phase.append(spectral_convergence(M, stft_magnitude(yh, card.n_fft, card.hop_length)))
        L = log_mel(sm.transform(y))
        sm.reset()
        if L.shape[1] >= W:
            x = L[:, :W]
            with torch.inference_mode():
                z = synth.module.encode(torch.from_numpy(x[None]))
                xh = synth.module(z, torch.from_numpy(synth.emb[labels.index(it.label)][None]))[0].numpy()
            synth.phase.reset()
            yc = np.concatenate([synth.frames_to_audio(xh), synth.finish()])
            sc_chain.append(spectral_convergence(M[:, :W], stft_magnitude(yc, card.n_fft, card.hop_length)))
    recon = {"vae_mel_magnitude": sc_vae, "phase_only": float(np.mean(sc_phase)),
             "chain_window": float(np.mean(sc_chain)) if sc_chain else None,
             "phase_iterations": synth.phase.n_iter, "n_windows": len(pick), "n_files": len(sc_phase)}

    # -- novelty ------------------------------------------------------------------------------------
    mean_band = np.mean(frames_real, axis=0)
    ref = {lab: [] for lab in labels}
    for it in train_items:
        ref[it.label].append(_centred_windows(feats[it.path].astype(np.float32), W, W // 2, mean_band))
    ref = {k: np.concatenate(v) if v else np.zeros((0, card.n_mels * W), np.float32) for k, v in ref.items()}
    ref_all = np.concatenate(list(ref.values()))
    real_nn = []
    for it in test_items:
        q = _centred_windows(feats[it.path].astype(np.float32), W, W, mean_band)
        if len(q) and len(ref[it.label]):
            real_nn.append(_max_cos(q, ref[it.label]))
    real_nn = np.concatenate(real_nn)
    threshold = float(np.percentile(real_nn, 99))
    gen_nn = np.concatenate([_max_cos(_centred_windows(log_mel(S), W, W, mean_band), ref_all)
                             for S in gen_mel.values()])
    dec_nn = np.concatenate([_max_cos(_centred_windows(x, W, W, mean_band), ref_all)
                             for ws_ in decoded.values() for x in ws_])
    novelty = {"threshold_real_p99": threshold, "real_heldout_nn_median": float(np.median(real_nn)),
               "generated_nn_median": float(np.median(gen_nn)), "generated_nn_max": float(gen_nn.max()),
               "near_copies": int((gen_nn > threshold).sum()), "n_generated_windows": len(gen_nn),
               "decoded": {"nn_median": float(np.median(dec_nn)), "nn_max": float(dec_nn.max()),
                           "near_copies": int((dec_nn > threshold).sum()), "n_windows": len(dec_nn)}}

    # -- morph -------------------------------------------------------------------------------------
    if pairs is None:
        pairs = [(labels[i], labels[(i + 1) % len(labels)]) for i in range(0, len(labels), 2)]
    morph = []
    for a, b in pairs:
        pb = []
        bi = labels.index(b)
        for mix in MIXES:
            ps = []
            for s in range(max(2, clips // 2)):
                synth.set_target(a, b, mix)
                synth.start(1000 + s)
                S = sm.transform(synth.render(n))
                sm.reset()
                ps.append(judge.probs(S).mean(0)[bi])
            pb.append(float(np.mean(ps)))
        morph.append({"a": a, "b": b, "p_b": pb})
    mean_curve = np.mean([m["p_b"] for m in morph], axis=0)
    morph_res = {"mixes": list(MIXES), "pairs": morph, "mean_p_b": mean_curve.tolist(),
                 "monotonic_on_average": bool(np.all(np.diff(mean_curve) > 0))}

    if plots is not None:
        _example_pngs(Path(plots), gen_mel, labels, card)
    return {"style_accuracy": style_acc, "style_per_composer": style_table, "clips_per_composer": clips,
            "judge_accuracy_on_real_clips": real_acc, "real_clips": real_n,
            "clip_seconds": seconds, "realism": realism, "reconstruction": recon, "novelty": novelty,
            "morph": morph_res, "generator": card.name, "classifier": judge.card.name}


def _example_pngs(out: Path, gen_mel: dict, labels, card) -> None:
    from .atomic import atomic_output
    from .plots import mel_panels_png

    out.mkdir(parents=True, exist_ok=True)
    panels = [(f"generated: {lab} (seed 0), re-analysed log-mel", gen_mel[(lab, 0)]) for lab in labels[:4]]
    with atomic_output(out / "generated_examples.png", force=True) as tmp:
        mel_panels_png(tmp, panels, card.sr, card.hop_length)


def print_report(r: dict, f) -> None:
    p = lambda *a: print(*a, file=f)  # noqa: E731
    p(f"generator {r['generator']}, judged by classifier {r['classifier']}")
    p(f"style accuracy: {r['style_accuracy']:.1%} ({r['clips_per_composer']} clips × {r['clip_seconds']:.0f} s per composer)")
    for k, v in r["style_per_composer"].items():
        p(f"  {k:<20} {v:.0%}")
    p(f"  (the same judge on {r['real_clips']} real held-out clips of that length: {r['judge_accuracy_on_real_clips']:.1%})")
    for name, v in (("log-mel frames", r["realism"]["logmel_frames"]),
                    ("classifier embeddings", r["realism"]["classifier_embeddings"])):
        p(f"realism ({name}): FD generated-vs-real {v['generated_vs_real']:.1f}, real-vs-real {v['real_vs_real']:.1f} "
          f"(ratio {v['ratio']:.2f})")
    rc = r["reconstruction"]
    p(f"reconstruction (spectral convergence): VAE {rc['vae_mel_magnitude']:.3f}, phase only {rc['phase_only']:.3f}, "
      f"whole chain {rc['chain_window'] if rc['chain_window'] is None else round(rc['chain_window'], 3)}")
    nv = r["novelty"]
    p(f"novelty: nearest-training-window cosine median {nv['generated_nn_median']:.3f}, max {nv['generated_nn_max']:.3f}; "
      f"real held-out p99 {nv['threshold_real_p99']:.3f} → {nv['near_copies']} near copies of {nv['n_generated_windows']}")
    if "decoded" in nv:
        d = nv["decoded"]
        p(f"  the decoder's own windows (before the crossfade): median {d['nn_median']:.3f}, max {d['nn_max']:.3f} "
          f"→ {d['near_copies']} near copies of {d['n_windows']}")
    m = r["morph"]
    p("morph P(B) at mix " + ", ".join(f"{x:g}" for x in m["mixes"]) + ": "
      + ", ".join(f"{x:.3f}" for x in m["mean_p_b"]) + (" (rises monotonically)" if m["monotonic_on_average"] else
                                                          " (NOT monotonic)"))
