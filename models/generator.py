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

__all__ = ["StyleVAE", "ExportedGenerator", "GenConfig", "train_generator", "slerp", "fit_latent_prior"]

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

    def validate(self):
        for k in ("frames", "hop_frames", "latent", "cond", "channels", "epochs", "batch_size"):
            if getattr(self, k) <= 0:
                raise ParameterError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.frames % 8:
            raise ParameterError(f"frames must be a multiple of 8, got {self.frames}")


def _kl(mu, logvar):
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


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

    def batch(ws, idx):
        x = (np.stack([ws.window(int(j)) for j in idx]) - mean_n) / std_n
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(ws.y[idx])

    def evaluate(ws) -> dict:
        vae.eval()
        se = kl = n = 0.0
        with torch.no_grad():
            for a in range(0, len(ws), 128):
                idx = np.arange(a, min(a + 128, len(ws)))
                x, y = batch(ws, idx)
                mu, logvar = vae.encode(x)
                xh = vae.decode(mu, vae.emb(y))
                se += float(((xh - x) ** 2).mean(dim=(1, 2)).sum())
                kl += float(_kl(mu, logvar).sum())
                n += len(idx)
        return {"mse": se / n, "kl": kl / n}

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
            x, y = batch(wtrain, order[s * cfg.batch_size:(s + 1) * cfg.batch_size])
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
    test = evaluate(wtest)
    exported = ExportedGenerator(vae, labels, mean, std).eval()
    exported.set_prior(*fit_latent_prior(exported.encode, wtrain, len(labels), seed=cfg.seed))
    with quiet_jit():
        scripted = torch.jit.script(exported)
    z = torch.randn(3, cfg.latent)
    e = exported.embeddings()[:3].detach()
    with torch.no_grad():
        if not torch.allclose(exported(z, e), scripted(z, e), atol=1e-4):
            raise BundleError("export check failed: the TorchScript model's outputs differ from the eager model's")
    with quiet_jit():
        scripted = torch.jit.freeze(scripted, preserved_attrs=["encode", "embeddings", "prior", "get_labels"])
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
                 "train_seconds": round(state["train_seconds"], 1)},
        extra={"arch": "stylevae", "latent": cfg.latent, "cond": cfg.cond, "config": card_config(cfg),
               "latent_prior": "per composer: Gaussian of its training windows' latent means (covariance "
                               f"shrunk {PRIOR_SHRINK * 100:g} % toward its diagonal)",
               "skipped_files": [p for p, _ in skipped]},
    )
    save_bundle(scripted, card, out_dir, force=force,
                extra_files={"split.json": (work / "split.json").read_bytes(),
                             "history.json": (work / "history.json").read_bytes()})
    return {"bundle": str(out_dir), "test": test, "params": n_params, "train_seconds": state["train_seconds"],
            "epochs_run": state["epoch"], "best_epoch": state["best_epoch"], "classes": describe(items),
            "total_seconds": time.time() - t0, "train_windows": len(wtrain), "extra_train_files": len(extra_items),
            "other_train_files": len(other_items)}
