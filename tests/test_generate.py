"""Generation: numba phase reconstruction, the style synth, the live Generator, `tarab generate`."""

import time

import librosa
import numpy as np
import pytest
import soundfile as sf
from conftest import run_cli
from synth import melody

from models.errors import ParameterError
from realtime.generate import Generator, StyleSynth, load_generator
from realtime.phase import PhaseReconstructor, spectral_convergence, stft_magnitude


@pytest.fixture(scope="module")
def signal():
    rng = np.random.default_rng(0)
    y = melody("alpha", 6.0, 1) + melody("beta", 6.0, 2)
    return (y + 0.01 * rng.standard_normal(len(y))).astype(np.float32)


def _reconstruct(pr, S, chunks):
    out, a = [], 0
    for k in chunks:
        out.append(pr.process(S[:, a:a + k]))
        a += k
        if a >= S.shape[1]:
            break
    out.append(pr.flush())
    return np.concatenate(out)


def test_phase_reconstruction_beats_librosa_griffinlim_at_equal_iterations(signal):
    S = stft_magnitude(signal)
    pr = PhaseReconstructor(n_iter=16, lookahead=4, max_frames=32)
    y = _reconstruct(pr, S, [32] * 1000)
    assert len(y) == (S.shape[1] - 1) * 512 + 2048  # every frame's samples, no more
    sc = spectral_convergence(S, stft_magnitude(y))
    ref = librosa.griffinlim(S, n_iter=16, hop_length=512, n_fft=2048, center=False, momentum=0.0,
                             init=None, random_state=0)
    sc_ref = spectral_convergence(S, stft_magnitude(ref))
    assert sc < sc_ref, (sc, sc_ref)  # streaming fast GL ≤ plain batch GL with as many iterations
    assert sc < 0.2
    zero = PhaseReconstructor(n_iter=0, lookahead=4, max_frames=32)  # the phase-advance start alone
    assert sc < 0.6 * spectral_convergence(S, stft_magnitude(_reconstruct(zero, S, [32] * 1000)))


def test_phase_reconstruction_any_chunking_and_reset(signal):
    S = stft_magnitude(signal[:44100])
    rng = np.random.default_rng(1)
    pr = PhaseReconstructor(n_iter=8, max_frames=16)
    a = _reconstruct(pr, S, rng.integers(1, 40, 200))  # chunks larger than max_frames are split
    b = _reconstruct(pr, S, rng.integers(1, 40, 200))
    assert len(a) == len(b) == (S.shape[1] - 1) * 512 + 2048
    for y in (a, b):
        assert np.isfinite(y).all()
        assert spectral_convergence(S, stft_magnitude(y)) < 0.3
    no_lookahead = _reconstruct(PhaseReconstructor(n_iter=4, lookahead=0, max_frames=16), S, [5] * 100)
    assert len(no_lookahead) == len(a)  # the last frame's tail is output by flush() here too
    # after flush() the state is fresh: the same chunking gives the same samples
    c1 = _reconstruct(pr, S, [7] * 100)
    c2 = _reconstruct(pr, S, [7] * 100)
    np.testing.assert_array_equal(c1, c2)


def test_phase_reconstruction_rejects_bad_input():
    pr = PhaseReconstructor(n_fft=256, hop_length=64)
    with pytest.raises(ParameterError, match="shape"):
        pr.process(np.zeros((100, 3)))
    with pytest.raises(ParameterError, match="NaN"):
        pr.process(np.full((129, 2), np.nan))
    with pytest.raises(ParameterError, match="divide"):
        PhaseReconstructor(n_fft=256, hop_length=100)


def test_synth_same_seed_same_audio_and_targets(tiny_models):
    _, _, gen = tiny_models
    s = StyleSynth(load_generator(gen))
    s.set_target("alpha")
    s.start(3)
    a = s.render(30000)
    s.start(3)
    b = s.render(30000)
    s.start(4)
    c = s.render(30000)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and len(a) == 30000 and np.abs(a).max() > 1e-3
    assert not np.allclose(a, c)
    s.set_target("alpha", "gamma", 1.0)
    s.start(3)
    d = s.render(30000)
    s.set_target("gamma")
    s.start(3)
    np.testing.assert_allclose(d, s.render(30000), atol=1e-5)  # mix 1 = the second composer
    with pytest.raises(ParameterError, match="unknown composer 'zeta'.*alpha, beta, gamma"):
        s.set_target("zeta")
    with pytest.raises(ParameterError, match="mix"):
        s.set_target("alpha", "beta", 1.5)


def test_latent_prior_is_each_composers_gaussian():
    import torch

    from models.generator import fit_latent_prior

    class Windows:  # the two things fit_latent_prior reads of a WindowSet
        def __init__(self, x, y):
            self.x, self.y = x, y

        def window(self, j):
            return self.x[j]

    rng = np.random.default_rng(0)
    n, d = 300, 6
    y = rng.integers(0, 3, n)
    x = (rng.standard_normal((n, 4, 5)) + 3.0 * y[:, None, None]).astype(np.float32)
    proj = torch.from_numpy(rng.standard_normal((20, d)).astype(np.float32))
    encode = lambda w: w.reshape(len(w), -1) @ proj  # noqa: E731
    mean, chol = fit_latent_prior(encode, Windows(x, y), 3, shrink=0.25, batch=7)
    z = x.reshape(n, -1).astype(np.float64) @ proj.numpy().astype(np.float64)
    for c in range(3):
        zc = z[y == c]
        np.testing.assert_allclose(mean[c].numpy(), zc.mean(0), rtol=1e-4, atol=1e-4)
        cov = np.cov(zc, rowvar=False)
        want = 0.75 * cov + 0.25 * np.diag(np.diag(cov))
        L = chol[c].numpy().astype(np.float64)
        assert np.allclose(L, np.tril(L)) and (np.diag(L) > 0).all()
        np.testing.assert_allclose(L @ L.T, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    few = fit_latent_prior(encode, Windows(x[:4], np.zeros(4, int)), 1)[1][0].numpy()  # 4 windows, 6 dims
    assert np.allclose(few, np.diag(np.diag(few)))  # only the diagonal is estimable: a = min(1, d / n)


def test_synth_draws_latents_from_the_composers_prior(tiny_models):
    _, _, gen = tiny_models
    s = StyleSynth(load_generator(gen))
    assert s.prior_mean.shape == (3, s.latent) and s.prior_chol.shape == (3, s.latent, s.latent)
    assert np.linalg.norm(s.prior_mean[0] - s.prior_mean[2]) > 0.1  # the composers' latents differ
    s.set_target("beta", temperature=0.0)  # temperature 0: the composer's mean latent, every window
    s.start(5)
    first = s.step_frames()
    x = s.decode_window(s.prior_mean[1], s.emb[1])
    np.testing.assert_allclose(first, x[:, :s.hop_frames], rtol=1e-5, atol=1e-4)
    s.set_target("alpha", "gamma", 0.5)
    m, L = s.latent_prior("alpha", "gamma", 0.5)
    np.testing.assert_allclose(m, 0.5 * (s.prior_mean[0] + s.prior_mean[2]), rtol=1e-6)
    np.testing.assert_allclose(L, 0.5 * (s.prior_chol[0] + s.prior_chol[2]), rtol=1e-6)


def test_windows_crossfade_only_over_their_overlap(tiny_models):
    _, _, gen = tiny_models
    bundle = load_generator(gen)
    s = StyleSynth(bundle)
    W = s.window_frames
    assert (s.overlap, s.hop_frames) == (round(0.375 * W), W - round(0.375 * W))
    k = iter(range(1, 100))
    s.decode_window = lambda z, cond: np.full((3, W), float(next(k)), np.float32)  # window k: all k
    s.start(0)
    first, second, third = s.step_frames(), s.step_frames(), s.step_frames()
    assert first.shape == (3, s.hop_frames) and (first == 1).all()  # a phrase starts on its first window
    o = s.overlap
    ramp = np.sin(0.5 * np.pi * (np.arange(o) + 0.5) / o) ** 2
    np.testing.assert_allclose(second[0, :o], 1 + ramp, rtol=1e-6)  # window 1 fades into window 2 ...
    assert (second[:, o:] == 2).all() and (third[:, o:] == 3).all()  # ... then window 2 alone
    s.decode_window = lambda z, cond: np.full((3, W), 7.0, np.float32)
    s.start(0)
    np.testing.assert_allclose(np.concatenate([s.step_frames() for _ in range(5)], 1), 7.0, rtol=1e-6)  # weights sum to 1
    half = StyleSynth(bundle, overlap=0.5)
    assert half.hop_frames == half.overlap == W // 2
    for bad in (0.0, 0.6, -0.1):
        with pytest.raises(ParameterError, match="overlap"):
            StyleSynth(bundle, overlap=bad)


def test_live_generator_matches_offline_and_never_waits(tiny_models):
    _, _, gen = tiny_models
    bundle = load_generator(gen)
    ref = StyleSynth(bundle)
    ref.set_target("beta", "gamma", 0.3, 0.8)
    ref.start(7)
    expect = ref.render(20000)
    g = Generator(bundle, ahead_s=1.0)
    with g:
        assert not g.render(256).any()  # nothing triggered: silence, immediately
        g.set_target("alpha")
        g.trigger(1)
        time.sleep(0.3)
        g.render(4096)
        g.set_target("beta", "gamma", 0.3, 0.8)
        g.trigger(7)  # the audio of the first phrase decoded ahead must be dropped
        t_end = time.time() + 5
        while g._gen[0] != 2 and time.time() < t_end:
            time.sleep(0.005)
        time.sleep(0.5)
        u0 = g.underruns
        got = []
        worst = 0.0
        for _ in range(40):
            t = time.perf_counter()
            got.append(g.render(500).copy())
            worst = max(worst, time.perf_counter() - t)
        assert g.underruns == u0
        assert g.faults == 0
    np.testing.assert_array_equal(np.concatenate(got), expect)
    assert worst < 0.01  # a copy from the ring, not a decode (a decode step takes tens of ms)


def test_cli_generate_writes_deterministic_audio_and_refuses_bad_input(tiny_models, tmp_path):
    _, _, gen = tiny_models
    r = run_cli("generate", "--model", gen, "--list")
    assert r.returncode == 0 and r.stdout.split() == ["alpha", "beta", "gamma"]
    a, b = tmp_path / "a.wav", tmp_path / "b.flac"
    for out in (a, b):
        r = run_cli("generate", "--model", gen, "--composer", "alpha", "--to", "beta", "--mix", "0.4",
                    "--seconds", "2.5", "--seed", "5", "-o", out, "--json")
        assert r.returncode == 0, r.stderr
    ya, sr = sf.read(a, dtype="float32")
    yb, _ = sf.read(b, dtype="float32")
    assert sr == 22050 and len(ya) == len(yb) == int(2.5 * 22050)
    np.testing.assert_allclose(ya, yb, atol=2e-4)  # same seed → same audio (FLAC is 24-bit)
    for args, msg in ((["--composer", "zeta"], "unknown composer 'zeta'"),
                      (["--composer", "alpha", "--to", "beta", "--mix", "1.5"], "mix"),
                      (["--composer", "alpha", "--seconds", "0"], "--seconds"),
                      (["--composer", "alpha", "--seconds", "-3"], "--seconds"),
                      (["--composer", "alpha", "-o", tmp_path / "no" / "x.wav"], "does not exist"),
                      (["--composer", "alpha", "-o", tmp_path / "x.xyz"], "unknown audio format"),
                      (["--composer", "alpha", "-o", a], "exists")):
        if "-o" not in args:
            args = args + ["-o", tmp_path / "bad.wav"]
        r = run_cli("generate", "--model", gen, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.flac"]


def test_evaluate_generation_runs_on_a_small_data_set(tiny_models, tmp_path):
    import json

    data, cls, gen = tiny_models
    r = run_cli("evaluate-generation", data, "--model", gen, "--classifier", cls, "--clips", "2", "--seconds", "2",
                "--plots", tmp_path, "--json", "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert 0.0 <= res["style_accuracy"] <= 1.0 and set(res["style_per_composer"]) == {"alpha", "beta", "gamma"}
    assert res["realism"]["logmel_frames"]["real_vs_real"] > 0
    assert 0 < res["reconstruction"]["phase_only"] < 0.3
    assert res["novelty"]["n_generated_windows"] > 0
    # every decoded window is checked too: 2 clips × 3 composers × ≥ 2 s / hop_frames (16 - 6) windows each
    assert res["novelty"]["decoded"]["n_windows"] >= 2 * 3 * 2 * 22050 // (512 * 10)
    assert 0 < res["novelty"]["decoded"]["nn_max"] <= 1.0 + 1e-5
    assert len(res["morph"]["mean_p_b"]) == 5
    assert (tmp_path / "generated_examples.png").stat().st_size > 10000


def test_frechet_matches_the_closed_form_and_survives_singular_covariances():
    import warnings

    import scipy.linalg

    from realtime.gen_eval import frechet

    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 2.0, (20000, 6)) * [1, 1, 1, 1, 1, 0]  # a dead unit: singular covariance
    b = rng.normal(0.0, 1.0, (20000, 6)) * [1, 1, 1, 1, 1, 0]
    # independent axes: |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2, from the samples' own moments
    closed = ((a.mean(0) - b.mean(0)) ** 2).sum() + ((a.std(0, ddof=1) - b.std(0, ddof=1)) ** 2).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet(a, b) == pytest.approx(closed, rel=0.01)
    c, d = rng.normal(size=(3000, 8)), rng.normal(size=(3000, 8)) @ rng.normal(size=(8, 8))
    c1, c2 = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    ref = ((c.mean(0) - d.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
    assert frechet(c, d) == pytest.approx(ref, rel=1e-9)
    assert frechet(c, c) == pytest.approx(0.0, abs=1e-9)


def test_shipped_generator_shares_the_classifier_split_and_licence():
    import json

    from models.bundle import PRETRAINED_DIR, load_bundle

    gen, cls = load_generator(), load_bundle(None, kind="classifier")
    assert gen.card.labels == cls.card.labels
    assert "CC BY-NC-SA 4.0" in gen.card.licence
    a = json.loads((PRETRAINED_DIR / "generator" / "split.json").read_text())
    b = json.loads((PRETRAINED_DIR / "classifier" / "split.json").read_text())
    assert a == b  # the generator never saw the classifier's validation or test pieces
    means, chols = (t.numpy() for t in gen.module.prior())
    assert means.shape == (len(gen.card.labels), gen.card.extra["latent"]) and np.abs(means).max() > 0
    assert np.allclose(chols, np.tril(chols))  # a fitted prior, not the N(0, I) placeholder
    assert not np.allclose(chols, np.eye(chols.shape[-1]))
    size = sum(p.stat().st_size for p in (PRETRAINED_DIR / "generator").iterdir())
    assert size <= 20 * 2 ** 20


def test_evaluate_generation_on_the_corpus(corpus, tmp_path):
    """The shipped models on the corpus, few clips (the full run's figures are in the README).

    In a subprocess: its gigabyte of features and novelty matrices leave with it, not burdening the
    live-audio tests that follow."""
    import json

    r = run_cli("evaluate-generation", corpus, "--clips", "1", "--seconds", "6", "--json")
    assert r.returncode == 0, r.stderr
    r = json.loads(r.stdout)
    assert r["clips_per_composer"] == 1 and len(r["style_per_composer"]) == 8
    assert r["realism"]["logmel_frames"]["real_vs_real"] > 0 and r["novelty"]["threshold_real_p99"] > 0
    assert r["novelty"]["near_copies"] == 0  # generation is not retrieval
    assert r["reconstruction"]["phase_only"] < 0.3


def test_render_keeping_windows_is_render_plus_each_decoded_window(tiny_models):
    _, _, gen = tiny_models
    synth = StyleSynth(load_generator(gen))
    n = 3 * 22050
    synth.set_target("beta")
    synth.start(4)
    y = synth.render(n)
    synth.start(4)
    wins = []
    y2 = synth.render(n, windows=wins)
    np.testing.assert_array_equal(y, y2)
    # one window per hop_frames frames, plus the one already decoded ahead of the last samples
    assert len(wins) >= n // (synth.hop_frames * synth.hop)
    assert all(w.shape == (synth.bundle.card.n_mels, synth.window_frames) for w in wins)
    assert not any(np.array_equal(a, b) for a, b in zip(wins, wins[1:]))
    synth.start(4)  # the same windows, decoded again from the same seed
    for w in wins[:3]:
        synth.step_frames()
        np.testing.assert_array_equal(synth.last_window, w)


def test_adversarial_stage_keeps_encoder_and_priors_and_changes_the_decoder(tiny_models, tmp_path):
    import json

    import torch

    from models.errors import BundleError
    from models.generator import unfreeze_generator

    data, cls, gen = tiny_models
    out = tmp_path / "sharp"
    r = run_cli("train-generator", data, "--from", gen, "--adversarial-steps", "30", "-o", out, "--json",
                "--cache-dir", tmp_path / "cache", "--threads", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 30 and summary["test_mse"] > 0
    a, b = load_generator(gen), load_generator(out)
    assert b.card.metrics["adversarial"]["steps"] == 30 and b.card.extra["config"]["adv_steps"] == 30
    assert b.card.date_created > a.card.date_created and b.card.labels == a.card.labels  # a new bundle, same composers
    assert len(json.loads((out / "adversarial_history.json").read_text())) >= 1
    assert (out / "split.json").read_bytes() == (gen / "split.json").read_bytes()
    x = torch.randn(5, a.card.n_mels, a.card.window_frames) * 10 - 40
    z = torch.randn(5, a.card.extra["latent"])
    with torch.no_grad():
        torch.testing.assert_close(a.module.encode(x), b.module.encode(x), atol=1e-4, rtol=0)  # frozen encoder
        for ta, tb in zip(a.module.prior(), b.module.prior()):
            torch.testing.assert_close(ta, tb)
        e = a.module.embeddings()[:1].expand(5, -1)
        assert (a.module(z, e) - b.module(z, e)).abs().max() > 0.01  # the decoder learned
    # the eager model read back from the frozen bundle gives its outputs; a wrong shape is refused
    vae, mean, std, pm, pc = unfreeze_generator(b.module, frames=16, latent=8, cond=4, channels=32)
    with torch.no_grad():
        eb = b.module.embeddings()[:1].expand(5, -1)
        torch.testing.assert_close(vae.decode(z, eb) * std[None, :, None] + mean[None, :, None], b.module(z, eb),
                                   atol=1e-3, rtol=0)
    with pytest.raises(BundleError, match="cannot read this generator"):
        unfreeze_generator(b.module, frames=16, latent=8, cond=4, channels=16)
    # bad input: one line, exit 2, no bundle
    for args, msg in (([], "--adversarial-steps N > 0"),
                      (["--adversarial-steps", "5", "--resume"], "not --resume"),
                      (["--adversarial-steps", "-2"], "adv_steps must be >= 0"),
                      (["--adversarial-steps", "5", "--feature-matching-weight", "-1"], "fm_weight")):
        r = run_cli("train-generator", data, "--from", gen, "-o", tmp_path / "bad", "--adversarial-steps", "0", *args,
                    "--cache-dir", tmp_path / "cache")
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("train-generator", data, "--from", cls, "-o", tmp_path / "bad", "--adversarial-steps", "5",
                "--cache-dir", tmp_path / "cache")
    assert r.returncode == 2 and "generator" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def test_train_generator_with_an_adversarial_stage(tiny_models, tmp_path):
    from models.generator import GenConfig, train_generator
    from realtime.mel import StreamingMel

    data, _, _ = tiny_models
    sm = StreamingMel()
    r = train_generator(data, tmp_path / "g", featurizer=sm.transform, mel_config=sm.config, cache_dir=tmp_path / "c",
                        progress=False, config=GenConfig(frames=16, hop_frames=4, latent=8, cond=4, channels=32, epochs=2,
                                                         batch_size=8, val_frac=0.25, test_frac=0.25, adv_steps=12))
    card = load_generator(tmp_path / "g").card
    assert card.metrics["adversarial"]["steps"] == 12
    assert card.metrics["test"]["mse_normalised"] == pytest.approx(r["test"]["mse"])
    assert card.metrics["adversarial"]["test_before"]["mse_normalised"] > 0
    assert (tmp_path / "g" / "adversarial_history.json").is_file()
