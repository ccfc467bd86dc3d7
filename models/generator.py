"""The style generator: a composer-conditioned convolutional VAE on log-mel windows.

Design (sized for 2 CPU cores):

- Input: a log-mel window (``n_mels`` × ``frames``, the classifier's features: the same
  ``StreamingMel`` frames), normalised per band with the training set's mean and std.
- Encoder: 1-D convolutions over time (mel bands as channels), strided ×2 three times, then a
  linear layer to the mean and log-variance of a ``latent``-dimensional Gaussian. The encoder
  does not see the composer, so the latent holds what the composer does not explain.
- Decoder: the latent and a learned composer embedding (``cond``) → a linear layer → three
  upsampling blocks, each modulated by the embedding (FiLM) → log-mel window.
- Latent prior per composer: the encoder never sees the composer, yet the latents of different
  composers' windows have different means and covariances (overlapping clouds), and the decoder
  leans on the latent far more than on the embedding. After training, :func:`fit_latent_prior`
  fits a Gaussian to each composer's training-window latents (mean, shrunk covariance as a
  Cholesky factor) and stores it in the bundle, so a composer's audio is drawn from that
  composer's part of the latent space, not from the N(0, I) prior shared by all.
- Morphing between composers interpolates the embeddings spherically (:func:`slerp`) and the
  prior Gaussians linearly; long audio decodes a smooth latent trajectory (an AR(1) walk ``u``
  that stays N(0, I), mapped to ``z = μ_c + T L_c u``) window by window with 50 % overlap and
  crossfades the windows (see ``realtime.generate``).

- Adversarial stage (:func:`adversarial_finetune`, optional): the VAE's decoder, given latents
  drawn from the composers' Gaussians, makes smooth, average windows; a small conditional critic
  of our own (spectrally normalised convolutions with a composer projection) is trained to tell
  them from real training windows, and the decoder to fool it, while the reconstruction loss keeps
  it a decoder of the (frozen) encoder's latents, so the latent Gaussians stay valid.

The generator is trained on the classifier's piece-level split (same seed), never against the
classifier, so the classifier stays an independent judge of style.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

from .bundle import Card, quiet_jit, save_bundle
from .data import WindowSet, describe
from .errors import BundleError, DataError, ParameterError

log = logging.getLogger(__name__)

__all__ = ["StyleVAE", "ExportedGenerator", "GenConfig", "train_generator", "slerp", "fit_latent_prior", "Critic",
           "adversarial_finetune", "unfreeze_generator", "finetune_generator"]

PRIOR_SHRINK = 0.1  # weight of the diagonal in each composer's latent covariance (fit_latent_prior)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of directions, linear interpolation of norms (``t`` in [0, 1])."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-8), b / nb.clamp_min(1e-8)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    om = torch.acos(cos)
    so = torch.sin(om)
    u = (torch.sin((1 - t) * om) * ua + torch.sin(t * om) * ub) / so
    return u * ((1 - t) * na + t * nb)


class _FiLMBlock(nn.Module):
    """Upsample ×2 → conv → FiLM(cond) → GELU → conv (residual)."""

    def __init__(self, ch: int, cond: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.c1 = nn.Conv1d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv1d(ch, ch, 3, padding=1)
        self.film = nn.Linear(cond, 2 * ch)
        self.act = nn.GELU()

    def forward(self, x, e):
        x = self.up(x)
        g, b = self.film(e).unsqueeze(-1).chunk(2, dim=1)
        h = self.act(self.c1(x) * (1 + g) + b)
        return x + self.c2(h)


class StyleVAE(nn.Module):
    def __init__(self, n_mels: int = 128, frames: int = 64, latent: int = 128, n_composers: int = 8,
                 cond: int = 16, ch: int = 256):
        super().__init__()
        if frames % 8:
            raise ParameterError(f"frames must be a multiple of 8, got {frames}")
        self.n_mels, self.frames, self.latent, self.ch = n_mels, frames, latent, ch
        self.enc = nn.Sequential(
            nn.Conv1d(n_mels, ch, 3, padding=1), nn.GELU(),
            nn.Conv1d(ch, ch, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(ch, ch, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(ch, ch, 4, stride=2, padding=1), nn.GELU(),
        )
        t8 = frames // 8
        self.to_stats = nn.Linear(ch * t8, 2 * latent)
        self.emb = nn.Embedding(n_composers, cond)
        self.from_z = nn.Linear(latent + cond, ch * t8)
        self.blocks = nn.ModuleList([_FiLMBlock(ch, cond) for _ in range(3)])
        self.out = nn.Conv1d(ch, n_mels, 3, padding=1)
        self.act = nn.GELU()

    def encode(self, x):
        h = self.enc(x).flatten(1)
        mu, logvar = self.to_stats(h).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z, e):
        h = self.act(self.from_z(torch.cat([z, e], dim=-1))).view(z.shape[0], self.ch, self.frames // 8)
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(h)

    def forward(self, x, y):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, self.emb(y)), mu, logvar


class ExportedGenerator(nn.Module):
    """TorchScript wrapper: latents + composer embeddings → log-mel windows in dB.

    ``forward(z, cond)``: ``z`` (batch, latent), ``cond`` (batch, cond) → (batch, n_mels, frames) dB.
    ``encode(logmel_db)`` → latent means; ``embeddings()`` → (n_composers, cond);
    ``prior()`` → the per-composer latent Gaussians: means (n_composers, latent) and Cholesky
    factors (n_composers, latent, latent) — N(0, I) for every composer until :meth:`set_prior`.
    """

    def __init__(self, vae: StyleVAE, labels: List[str], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.vae = vae
        self.labels: List[str] = list(labels)
        self.register_buffer("mean", mean.reshape(1, -1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1).float())
        k, d = len(self.labels), vae.latent
        self.register_buffer("prior_mean", torch.zeros(k, d))
        self.register_buffer("prior_chol", torch.eye(d).expand(k, d, d).clone())

    def set_prior(self, mean: torch.Tensor, chol: torch.Tensor) -> None:
        if tuple(mean.shape) != tuple(self.prior_mean.shape) or tuple(chol.shape) != tuple(self.prior_chol.shape):
            raise ParameterError(f"prior shapes {tuple(mean.shape)}, {tuple(chol.shape)} do not fit "
                                 f"{tuple(self.prior_mean.shape)}, {tuple(self.prior_chol.shape)}")
        self.prior_mean.copy_(mean)
        self.prior_chol.copy_(chol)

    def forward(self, z, cond):
        return self.vae.decode(z, cond) * self.std + self.mean

    @torch.jit.export
    def encode(self, logmel_db):
        mu, _ = self.vae.encode((logmel_db - self.mean) / self.std)
        return mu

    @torch.jit.export
    def embeddings(self):
        return self.vae.emb.weight

    @torch.jit.export
    def prior(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.prior_mean, self.prior_chol

    @torch.jit.export
    def get_labels(self) -> List[str]:
        return self.labels


def fit_latent_prior(encode, ws: WindowSet, n_classes: int, *, shrink: float = PRIOR_SHRINK, batch: int = 256,
                     max_per_class: int = 4000, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian per composer over the latents of its windows.

    Parameters
    ----------
    encode : callable
        log-mel windows [dB] (batch, n_mels, frames) tensor → latent means (batch, latent).
    ws : WindowSet
        The windows (the training split).
    n_classes : int
    shrink : float in [0, 1]
        Weight of the diagonal in the covariance estimate ``(1 - a) C + a diag(C)``; raised to
        ``latent / n`` for a composer with few windows ``n``, so the estimate stays well-posed.
    max_per_class : int
        At most this many windows per composer (a seeded draw).

    Returns
    -------
    mean : torch.Tensor [shape=(n_classes, latent)]
    chol : torch.Tensor [shape=(n_classes, latent, latent)], lower-triangular: ``z = mean[c] + chol[c] @ ε``.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(ws.y)
    means, chols = [], []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        if idx.size == 0:
            raise DataError(f"no training windows of composer {c} to fit its latent prior")
        if idx.size > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        with torch.no_grad():
            z = torch.cat([encode(torch.from_numpy(np.stack([ws.window(int(j)) for j in idx[a:a + batch]])
                                                   .astype(np.float32)))
                           for a in range(0, idx.size, batch)]).double()
        m = z.mean(0)
        d = z.shape[1]
        cov = (z - m).T @ (z - m) / max(1, z.shape[0] - 1)
        a = min(1.0, max(shrink, d / z.shape[0]))
        cov = (1.0 - a) * cov + a * torch.diag(torch.diag(cov)) + 1e-6 * torch.eye(d, dtype=cov.dtype)
        means.append(m)
        chols.append(torch.linalg.cholesky(cov))
    return torch.stack(means).float(), torch.stack(chols).float()


class Critic(nn.Module):
    """Conditional critic of normalised log-mel windows: real (training) or decoded?

    Spectrally normalised 1-D convolutions over time (bands as channels), strided ×2 three times,
    a score per remaining time step plus a projection on a learned composer embedding
    (Miyato & Koyama's projection discriminator). ``forward(x, y)`` → (scores (B, T/8), features).
    """

    def __init__(self, n_mels: int, n_composers: int, ch: int = 256):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.convs = nn.ModuleList([sn(nn.Conv1d(n_mels, ch, 5, 1, 2)), sn(nn.Conv1d(ch, ch, 4, 2, 1)),
                                    sn(nn.Conv1d(ch, ch, 4, 2, 1)), sn(nn.Conv1d(ch, ch, 4, 2, 1))])
        self.out = sn(nn.Conv1d(ch, 1, 3, 1, 1))
        self.emb = sn(nn.Embedding(n_composers, ch))

    def forward(self, x, y):
        feats = []
        h = x
        for conv in self.convs:
            h = nn.functional.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return self.out(h).squeeze(1) + (self.emb(y)[:, :, None] * h).sum(1), feats


def _batch(ws: WindowSet, idx, mean_n: np.ndarray, std_n: np.ndarray):
    """Windows ``idx`` of ``ws``, band-normalised, as float32 tensors ``(x, y)``."""
    x = (np.stack([ws.window(int(j)) for j in idx]) - mean_n) / std_n
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(ws.y[idx])


def _feature_matching(fake_feats, real_feats):
    """Mean over layers of |mean - mean'| + |std - std'| of each channel (over batch and time)."""
    tot = 0.0
    for a, b in zip(fake_feats, real_feats):
        tot = tot + (a.mean((0, 2)) - b.mean((0, 2))).abs().mean() + (a.std((0, 2)) - b.std((0, 2))).abs().mean()
    return tot / len(fake_feats)


def adversarial_finetune(vae: StyleVAE, ws: WindowSet, mean: np.ndarray, std: np.ndarray, prior_mean: torch.Tensor,
                         prior_chol: torch.Tensor, *, steps: int, adv_weight: float = 0.1, fm_weight: float = 0.5,
                         recon_weight: float = 2.0, batch_size: int = 64, seed: int = 0, progress: bool = True,
                         log_every: int = 250) -> list:
    """Sharpen the decoder for the latents it is sampled from (the composers' Gaussians).

    Per batch, with the encoder frozen: the critic sees real training windows (with their
    composers) and windows decoded from ``z = prior_mean[c] + prior_chol[c] ε`` (random composers
    ``c``, balanced) and takes a hinge-loss step; the decoder then minimises
    ``recon_weight · MSE(reconstruction) − adv_weight · critic(fake) + fm_weight · feature matching``.
    Composers are balanced in both real and fake batches. Returns a history record per
    ``log_every`` batches.

    Parameters
    ----------
    vae : StyleVAE
        Trained; changed in place (decoder and composer embeddings only).
    ws : WindowSet
        Training windows (log-mel dB).
    mean, std : np.ndarray [shape=(n_mels,)]
        The bundle's band normalisation.
    prior_mean, prior_chol : torch.Tensor
        The composers' latent Gaussians (:func:`fit_latent_prior`).
    """
    from tqdm import tqdm

    if steps <= 0:
        raise ParameterError(f"steps must be > 0, got {steps}")
    n_comp = prior_mean.shape[0]
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    critic = Critic(vae.n_mels, n_comp)
    for p in list(vae.enc.parameters()) + list(vae.to_stats.parameters()):
        p.requires_grad_(False)
    gparams = [p for p in vae.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(gparams, 1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(critic.parameters(), 2e-4, betas=(0.5, 0.9))
    counts = np.bincount(ws.y, minlength=n_comp).astype(np.float64)
    p_win = np.where(counts[ws.y] > 0, 1.0 / np.maximum(counts[ws.y], 1), 0.0)
    p_win /= p_win.sum()
    mean_n, std_n = np.asarray(mean)[None, :, None], np.asarray(std)[None, :, None]
    present = np.flatnonzero(counts > 0)
    history, acc, t0 = [], np.zeros(4), time.time()
    vae.train()
    bar = tqdm(range(steps), desc="adversarial", unit="batch", disable=not progress, leave=False)
    for step in bar:
        idx = rng.choice(len(ws), batch_size, p=p_win)
        x, y = _batch(ws, idx, mean_n, std_n)
        yf = torch.from_numpy(rng.choice(present, batch_size))
        zf = prior_mean[yf] + (prior_chol[yf] @ torch.randn(batch_size, vae.latent, 1)).squeeze(-1)
        with torch.no_grad():
            mu, logvar = vae.encode(x)
        fake = vae.decode(zf, vae.emb(yf))
        d_real, _ = critic(x, y)
        d_fake, _ = critic(fake.detach(), yf)
        loss_d = nn.functional.relu(1 - d_real).mean() + nn.functional.relu(1 + d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        xh = vae.decode(mu + torch.randn_like(mu) * torch.exp(0.5 * logvar), vae.emb(y))
        mse = ((xh - x) ** 2).mean()
        d_fake, f_fake = critic(fake, yf)
        with torch.no_grad():
            _, f_real = critic(x, y)
        fm = _feature_matching(f_fake, f_real)
        loss_g = recon_weight * mse - adv_weight * d_fake.mean() + fm_weight * fm
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(gparams, 5.0)
        opt_g.step()
        acc += [float(loss_d.detach()), float(mse.detach()), float(d_fake.detach().mean()), float(fm.detach())]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            rec = {"step": step + 1, "critic_loss": acc[0] / n, "recon_mse": acc[1] / n, "critic_fake": acc[2] / n,
                   "feature_matching": acc[3] / n, "seconds": round(time.time() - t0, 1)}
            history.append(rec)
            log.info("adversarial step %d: critic %.3f, recon mse %.3f, fm %.3f", step + 1, rec["critic_loss"],
                     rec["recon_mse"], rec["feature_matching"])
            acc[:] = 0
    for p in vae.parameters():
        p.requires_grad_(True)
    vae.eval()
    return history


def unfreeze_generator(module, *, frames: int, latent: int, cond: int, channels: int):
    """The eager :class:`StyleVAE`, band normalisation and latent priors of a frozen generator bundle.

    ``torch.jit.freeze`` keeps the weights only as the graph's constants; they are read back in
    the order the methods use them, and the rebuilt model must give the bundle's outputs (to 1e-3
    dB), or a :class:`BundleError` says that this bundle cannot be fine-tuned.

    Returns ``(vae, mean, std, prior_mean, prior_chol)``.
    """
    try:
        _, ke = module.encode.code_with_constants
        _, kf = module.forward.code_with_constants
        _, kp = module.prior.code_with_constants
        mean, std = ke["c0"].reshape(-1), ke["c1"].reshape(-1)
        emb = module.embeddings().detach().clone()
        vae = StyleVAE(mean.numel(), frames, latent, emb.shape[0], cond, channels)
        sd = vae.state_dict()
        for name, (w, b) in {"enc.0": (2, 3), "enc.2": (4, 5), "enc.4": (6, 7), "enc.6": (8, 9),
                             "to_stats": (10, 11)}.items():
            sd[name + ".weight"], sd[name + ".bias"] = ke[f"c{w}"], ke[f"c{b}"]
        sd["from_z.weight"], sd["from_z.bias"] = kf["c0"], kf["c1"]
        for i in range(len(vae.blocks)):
            o = 2 + 6 * i
            for k, part in enumerate(("film", "c1", "c2")):
                sd[f"blocks.{i}.{part}.weight"] = kf[f"c{o + 2 * k}"]
                sd[f"blocks.{i}.{part}.bias"] = kf[f"c{o + 2 * k + 1}"]
        last = 2 + 6 * len(vae.blocks)  # the output layer, with `* std + mean` folded in by freeze
        sd["out.weight"] = kf[f"c{last}"] / std[:, None, None]
        sd["out.bias"] = (kf[f"c{last + 1}"] - mean) / std
        sd["emb.weight"] = emb
        vae.load_state_dict(sd)
    except (KeyError, RuntimeError, AttributeError) as e:
        raise BundleError(f"cannot read this generator's weights back for fine-tuning ({e})") from None
    vae.eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, latent, generator=g)
    e = emb[torch.arange(4) % emb.shape[0]]
    x = torch.randn(4, mean.numel(), frames, generator=g) * 10 - 40
    with torch.no_grad():
        d_dec = float((vae.decode(z, e) * std[None, :, None] + mean[None, :, None] - module(z, e)).abs().max())
        d_enc = float((vae.encode((x - mean[None, :, None]) / std[None, :, None])[0] - module.encode(x)).abs().max())
    if not (d_dec < 1e-3 and d_enc < 1e-3):
        raise BundleError(f"cannot read this generator's weights back for fine-tuning (outputs differ by "
                          f"{d_dec:.2g} dB / {d_enc:.2g})")
    pm, pc = kp["c0"].clone(), kp["c1"].clone()
    return vae, mean, std, pm, pc


def _export(vae, labels, mean, std, prior, latent: int):
    """Script, check and freeze the generator (the bundle's model)."""
    exported = ExportedGenerator(vae, labels, mean, std).eval()
    exported.set_prior(*prior)
    with quiet_jit():
        scripted = torch.jit.script(exported)
    z = torch.randn(3, latent)
    e = exported.embeddings()[torch.arange(3) % len(labels)].detach()
    with torch.no_grad():
        if not torch.allclose(exported(z, e), scripted(z, e), atol=1e-4):
            raise BundleError("export check failed: the TorchScript model's outputs differ from the eager model's")
    with quiet_jit():
        return torch.jit.freeze(scripted, preserved_attrs=["encode", "embeddings", "prior", "get_labels"])


@dataclass
class GenConfig:
    frames: int = 64  # ≈ 1.49 s at hop 512 / 22050 Hz
    hop_frames: int = 16
    latent: int = 128
    cond: int = 16
    channels: int = 256
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    recon_weight: float = 2.0  # 1 / (2 σ²) of the Gaussian likelihood, in normalised units
    kl_warmup_epochs: int = 3
    seed: int = 0
    val_frac: float = 0.2  # the classifier's split
    test_frac: float = 0.2
    patience: int = 6
    max_train_windows: int = 0  # 0 = all (per epoch)
    time_budget_s: float = 0.0
    threads: int = 0  # 0 = torch default
    extra_train: str = ""  # other renderings of the same pieces; only training pieces' files are used
    other_train: str = ""  # pieces outside the corpus (none of its piece ids); all used for training
    adv_steps: int = 0  # adversarial stage after the VAE (batches; 0 = none)
    adv_weight: float = 0.1  # weight of the critic's verdict on decoded prior samples
    fm_weight: float = 0.5  # weight of feature matching (critic features of fakes vs real windows)

    def validate(self):
        for k in ("frames", "hop_frames", "latent", "cond", "channels", "epochs", "batch_size"):
            if getattr(self, k) <= 0:
                raise ParameterError(f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("adv_steps", "adv_weight", "fm_weight"):
            if getattr(self, k) < 0:
                raise ParameterError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.frames % 8:
            raise ParameterError(f"frames must be a multiple of 8, got {self.frames}")


def _kl(mu, logvar):
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _recon_stats(vae, ws: WindowSet, mean_n: np.ndarray, std_n: np.ndarray) -> dict:
    """Mean normalised reconstruction MSE (decoding the latent means) and KL over a window set."""
    vae.eval()
    se = kl = n = 0.0
    with torch.no_grad():
        for a in range(0, len(ws), 128):
            idx = np.arange(a, min(a + 128, len(ws)))
            x, y = _batch(ws, idx, mean_n, std_n)
            mu, logvar = vae.encode(x)
            xh = vae.decode(mu, vae.emb(y))
            se += float(((xh - x) ** 2).mean(dim=(1, 2)).sum())
            kl += float(_kl(mu, logvar).sum())
            n += len(idx)
    return {"mse": se / n, "kl": kl / n}


def train_generator(data_dir, out_dir, *, featurizer, mel_config: dict, config: GenConfig | None = None,
                    cache_dir=None, resume: bool = False, force: bool = False, progress: bool = True,
                    items=None) -> dict:
    """Train the style VAE on the piece-level training split and export a generator bundle.

    Parameters are those of :func:`models.train.train`. Returns figures (validation/test
    reconstruction, KL, timings) and the bundle path.
    """
    import shutil

    from tqdm import tqdm

    from .train import (SYMBTR_LICENCE, _atomic_torch_save, add_extra_training, band_stats, card_config,
                        check_run_dirs, load_split_features, resume_from, training_data_note)

    cfg = config or GenConfig()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    work = check_run_dirs(out_dir, resume, force)
    if work.exists() and force and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    items, labels, split, by_set, feats, skipped = load_split_features(
        data_dir, work, items, cfg.seed, cfg.val_frac, cfg.test_frac, featurizer, mel_config, cache_dir, progress)
    extra_items = add_extra_training(cfg.extra_train, data_dir, split, labels, feats, skipped, featurizer,
                                     mel_config, cache_dir, progress)
    other_items = add_extra_training(cfg.other_train, data_dir, split, labels, feats, skipped, featurizer,
                                     mel_config, cache_dir, progress, other_pieces=True)
    wtrain = WindowSet(by_set["train"] + extra_items + other_items, feats, labels, cfg.frames, cfg.hop_frames)
    wval = WindowSet(by_set["val"], feats, labels, cfg.frames, cfg.frames)
    wtest = WindowSet(by_set["test"], feats, labels, cfg.frames, cfg.frames)
    for name, ws in (("train", wtrain), ("validation", wval), ("test", wtest)):
        if len(ws) == 0:
            raise DataError(f"the {name} split has no windows")
    mean, std = band_stats(wtrain, cfg.seed)
    mean_n, std_n = mean.numpy()[None, :, None], std.numpy()[None, :, None]
    n_mels = int(mel_config["n_mels"])
    vae = StyleVAE(n_mels, cfg.frames, cfg.latent, len(labels), cfg.cond, cfg.channels)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n_per_epoch = cfg.max_train_windows or len(wtrain)
    steps = max(1, n_per_epoch // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps,
                                                pct_start=0.1)
    # balanced composers: sample windows with probability ∝ 1 / (windows of their composer)
    counts = np.bincount(wtrain.y, minlength=len(labels)).astype(np.float64)
    p_win = 1.0 / counts[wtrain.y]
    p_win /= p_win.sum()

    def evaluate(ws) -> dict:
        return _recon_stats(vae, ws, mean_n, std_n)

    state = {"epoch": 0, "best": float("inf"), "best_epoch": -1, "bad": 0, "history": [], "train_seconds": 0.0}
    ckpt_path, best_path = work / "checkpoint.pt", work / "best.pt"
    if resume:
        state = resume_from(ckpt_path, cfg, labels, vae, opt, sched, ignore=("time_budget_s", "threads"))
    t_train0 = time.time() - state["train_seconds"]
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        vae.train()
        torch.manual_seed(cfg.seed * 100003 + epoch)
        erng = np.random.default_rng([cfg.seed, epoch])
        order = erng.choice(len(wtrain), size=steps * cfg.batch_size, replace=True, p=p_win)
        beta = min(1.0, (epoch + 1) / max(1, cfg.kl_warmup_epochs))
        tot = {"loss": 0.0, "mse": 0.0, "kl": 0.0}
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress,
                   leave=False)
        for s in bar:
            x, y = _batch(wtrain, order[s * cfg.batch_size:(s + 1) * cfg.batch_size], mean_n, std_n)
            xh, mu, logvar = vae(x, y)
            mse = ((xh - x) ** 2).mean(dim=(1, 2))
            kl = _kl(mu, logvar)
            loss = (cfg.recon_weight * mse * x[0].numel() + beta * kl).mean() / x[0].numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 5.0)
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            tot["loss"] += float(loss.detach())
            tot["mse"] += float(mse.detach().mean())
            tot["kl"] += float(kl.detach().mean())
            bar.set_postfix(mse=f"{tot['mse'] / (s + 1):.3f}", kl=f"{tot['kl'] / (s + 1):.1f}")
        val = evaluate(wval)
        val_loss = cfg.recon_weight * val["mse"] * n_mels * cfg.frames + val["kl"]  # negative ELBO (β = 1)
        state["epoch"] = epoch + 1
        state["train_seconds"] = time.time() - t_train0
        rec = {"epoch": epoch + 1, "train_mse": tot["mse"] / steps, "train_kl": tot["kl"] / steps, "beta": beta,
               "val_mse": val["mse"], "val_kl": val["kl"], "val_loss": val_loss, "seconds": state["train_seconds"]}
        state["history"].append(rec)
        improved = val_loss < state["best"] - 1e-3
        if improved:
            state.update(best=val_loss, best_epoch=epoch + 1, bad=0)
            _atomic_torch_save(vae.state_dict(), best_path)
        else:
            state["bad"] += 1
        _atomic_torch_save({"model": vae.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                            "state": json.dumps(state), "config": dataclasses.asdict(cfg), "labels": labels}, ckpt_path)
        (work / "history.json").write_text(json.dumps(state["history"], indent=1) + "\n")
        log.info("epoch %d: train mse %.3f kl %.1f | val mse %.3f kl %.1f%s", epoch + 1, rec["train_mse"],
                 rec["train_kl"], val["mse"], val["kl"], " *" if improved else "")
        if state["bad"] >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        if cfg.time_budget_s and state["train_seconds"] >= cfg.time_budget_s:
            log.info("time budget of %.0f s reached after epoch %d", cfg.time_budget_s, epoch + 1)
            break
    if best_path.is_file():
        vae.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
    vae.eval()
    test = test_vae = evaluate(wtest)
    prior = fit_latent_prior(ExportedGenerator(vae, labels, mean, std).eval().encode, wtrain, len(labels), seed=cfg.seed)
    adv_history = []
    if cfg.adv_steps:
        adv_history = adversarial_finetune(vae, wtrain, mean.numpy(), std.numpy(), *prior, steps=cfg.adv_steps,
                                           adv_weight=cfg.adv_weight, fm_weight=cfg.fm_weight,
                                           recon_weight=cfg.recon_weight, batch_size=cfg.batch_size, seed=cfg.seed,
                                           progress=progress)
        test = evaluate(wtest)
    scripted = _export(vae, labels, mean, std, prior, cfg.latent)
    n_params = sum(p.numel() for p in vae.parameters())
    card = Card(
        kind="generator", name=f"{Path(data_dir).name}-stylevae", labels=labels,
        sr=int(mel_config["sr"]), n_fft=int(mel_config["n_fft"]), hop_length=int(mel_config["hop_length"]),
        n_mels=n_mels, fmin=float(mel_config["fmin"]),
        fmax=None if mel_config["fmax"] is None else float(mel_config["fmax"]), window_frames=cfg.frames,
        training_data=(f"{Path(data_dir).name}: {len(items)} files, {len(labels)} composers; piece-level split "
                       f"(seed {cfg.seed}, the classifier's): trained on {len(split['train'])} pieces, "
                       f"{len(split['val'])} validation, {len(split['test'])} test"
                       + training_data_note(extra_items, other_items, cfg.extra_train, cfg.other_train)),
        licence=SYMBTR_LICENCE,
        metrics={"test": {"mse_normalised": test["mse"], "kl": test["kl"]}, "params": n_params,
                 "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
                 "train_seconds": round(state["train_seconds"], 1),
                 **_adversarial_metrics(adv_history, test_vae)},
        extra={"arch": "stylevae", "latent": cfg.latent, "cond": cfg.cond, "config": card_config(cfg),
               "latent_prior": "per composer: Gaussian of its training windows' latent means (covariance "
                               f"shrunk {PRIOR_SHRINK * 100:g} % toward its diagonal)",
               "skipped_files": [p for p, _ in skipped]},
    )
    save_bundle(scripted, card, out_dir, force=force,
                extra_files={"split.json": (work / "split.json").read_bytes(),
                             "history.json": (work / "history.json").read_bytes(),
                             **_adversarial_files(adv_history)})
    return {"bundle": str(out_dir), "test": test, "params": n_params, "train_seconds": state["train_seconds"],
            "epochs_run": state["epoch"], "best_epoch": state["best_epoch"], "classes": describe(items),
            "total_seconds": time.time() - t0, "train_windows": len(wtrain), "extra_train_files": len(extra_items),
            "other_train_files": len(other_items)}


def _adversarial_metrics(history: list, test_before: dict) -> dict:
    if not history:
        return {}
    return {"adversarial": {"steps": history[-1]["step"], "seconds": history[-1]["seconds"],
                            "test_before": {"mse_normalised": test_before["mse"], "kl": test_before["kl"]}}}


def _adversarial_files(history: list) -> dict:
    return {"adversarial_history.json": (json.dumps(history, indent=1) + "\n").encode()} if history else {}


def finetune_generator(bundle_path, data_dir, out_dir, *, featurizer, mel_config: dict, steps: int,
                       adv_weight: float = 0.1, fm_weight: float = 0.5, threads: int = 0, cache_dir=None,
                       force: bool = False, progress: bool = True) -> dict:
    """Run the adversarial stage (:func:`adversarial_finetune`) on a trained generator bundle.

    The bundle's own piece split is rebuilt from ``data_dir`` (same seed and fractions) and must
    match its ``split.json``; only its training pieces are used (extra renderings named in its
    card are not). The encoder and the latent Gaussians are kept; the new bundle goes to
    ``out_dir`` with the card's metrics updated. Returns figures and the bundle path.
    """
    from .bundle import load_bundle
    from .train import SYMBTR_LICENCE, load_split_features

    bundle = load_bundle(bundle_path, kind="generator")
    card, cfg = bundle.card, dict(bundle.card.extra.get("config", {}))
    if bundle.card.extra.get("arch") != "stylevae":
        raise BundleError(f"{bundle.path}: not a style VAE generator")
    for k in ("sr", "n_fft", "hop_length", "n_mels", "fmin", "fmax"):
        if mel_config.get(k) != getattr(card, k):
            raise ParameterError(f"the features' {k} ({mel_config.get(k)}) differs from the bundle's ({getattr(card, k)})")
    split_file = Path(bundle.path) / "split.json"
    if not split_file.is_file():
        raise BundleError(f"{bundle.path}: no split.json (needed to know the training pieces)")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    seed = int(cfg.get("seed", 0))
    items, labels, split, by_set, feats, _ = load_split_features(
        data_dir, None, None, seed, float(cfg.get("val_frac", 0.2)), float(cfg.get("test_frac", 0.2)), featurizer,
        mel_config, cache_dir, progress)
    shipped = json.loads(split_file.read_text())
    if labels != list(card.labels) or any(sorted(split[k]) != sorted(shipped[k]) for k in ("train", "val", "test")):
        raise DataError(f"{data_dir}: its composers or piece split differ from the bundle's (not the data it was trained on)")
    frames = card.window_frames
    latent, cond = int(card.extra["latent"]), int(card.extra["cond"])
    vae, mean, std, pm, pc = unfreeze_generator(bundle.module, frames=frames, latent=latent, cond=cond,
                                                channels=int(cfg.get("channels", 256)))
    wtrain = WindowSet(by_set["train"], feats, labels, frames, int(cfg.get("hop_frames", 16)))
    wtest = WindowSet(by_set["test"], feats, labels, frames, frames)
    mean_n, std_n = mean.numpy()[None, :, None], std.numpy()[None, :, None]
    before = _recon_stats(vae, wtest, mean_n, std_n)
    history = adversarial_finetune(vae, wtrain, mean.numpy(), std.numpy(), pm, pc, steps=steps, adv_weight=adv_weight,
                                   fm_weight=fm_weight, recon_weight=float(cfg.get("recon_weight", 2.0)),
                                   batch_size=int(cfg.get("batch_size", 64)), seed=seed, progress=progress)
    after = _recon_stats(vae, wtest, mean_n, std_n)
    scripted = _export(vae, labels, mean, std, (pm, pc), latent)
    metrics = dict(card.metrics, test={"mse_normalised": after["mse"], "kl": after["kl"]},
                   **_adversarial_metrics(history, before))
    cfg.update(adv_steps=steps, adv_weight=adv_weight, fm_weight=fm_weight)
    fresh = {f.name: f.default_factory() for f in dataclasses.fields(card) if f.name in ("tarab_version", "date_created")}
    new_card = dataclasses.replace(card, metrics=metrics, licence=card.licence or SYMBTR_LICENCE,
                                   extra=dict(card.extra, config=cfg), **fresh)
    extra_files = {name: (Path(bundle.path) / name).read_bytes() for name in ("split.json", "history.json")
                   if (Path(bundle.path) / name).is_file()}
    save_bundle(scripted, new_card, out_dir, force=force, extra_files={**extra_files, **_adversarial_files(history)})
    return {"bundle": str(out_dir), "test_before": before, "test": after, "steps": steps,
            "seconds": time.time() - t0, "train_windows": len(wtrain)}
