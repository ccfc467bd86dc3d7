"""Training of the composer classifier: piece-level split, cached features, augmentation,
class weights, validation every epoch, early stopping, resumable checkpoints, optional DDP.

Run through ``tarab train`` (which supplies the streaming-mel featurizer). Under ``torchrun``
(``WORLD_SIZE`` > 1) it trains with DistributedDataParallel on the gloo backend; rank 0 alone
writes checkpoints and the bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .bundle import Card, save_bundle
from .data import Augmenter, FeatureCache, Item, WindowSet, describe, save_split, scan_dataset, split_pieces
from .errors import BundleError, DataError, ParameterError

log = logging.getLogger(__name__)

__all__ = ["ARCH_NAMES", "TrainConfig", "train", "evaluate_windows", "SYMBTR_LICENCE"]

ARCH_NAMES = ("compact", "temporal", "paper")  # models.nets.ARCHS, without importing torch
SYMBTR_LICENCE = ("CC BY-NC-SA 4.0. Trained on audio rendered from SymbTr (M. K. Karaosmanoğlu, "
                  "'A Turkish makam music symbolic database for music information retrieval: SymbTr', "
                  "ISMIR 2012; Music Technology Group, Universitat Pompeu Fabra). No commercial use; "
                  "share derivatives under the same licence.")


@dataclasses.dataclass
class TrainConfig:
    """Training settings (all stored in the checkpoint and the bundle card)."""

    arch: str = "temporal"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    window_frames: int = 216
    train_hop_frames: int = 108
    eval_hop_frames: int = 108
    patience: int = 6
    seed: int = 0  # the piece split's seed; also the initialisation's unless init_seed is set
    init_seed: int = -1  # >= 0: weights, augmentation and batch order from this seed, the split from ``seed``
    val_frac: float = 0.2
    test_frac: float = 0.2
    augment: bool = True
    pitch_shift_semitones: float = 1.0
    leaky_window_split: bool = False  # the paper's window-level split (leaks pieces); comparison only
    max_train_windows: int = 0  # 0 = all; >0 subsamples each epoch (quick runs, tests)
    time_budget_s: float = 0.0  # 0 = none; stop after the epoch that crosses it
    extra_train: str = ""  # a data set of other renders of the same pieces; only training pieces' files are used
    other_train: str = ""  # a data set of pieces outside the corpus (none of its piece ids); all used for training
    aux_weight: float = 0.0  # >0: heads that also predict each training window's makam, form and usul (training only)

    def validate(self):
        if self.arch not in ARCH_NAMES:
            raise ParameterError(f"arch: {self.arch!r} is not one of {list(ARCH_NAMES)}")
        for k in ("epochs", "batch_size", "window_frames", "train_hop_frames", "eval_hop_frames"):
            if getattr(self, k) < 1:
                raise ParameterError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if not 0 < self.lr < 1:
            raise ParameterError(f"lr: {self.lr} out of range (0, 1)")
        if self.aux_weight < 0:
            raise ParameterError(f"aux_weight: must be >= 0, got {self.aux_weight}")
        if (self.extra_train or self.other_train) and self.leaky_window_split:
            raise ParameterError("extra_train and leaky_window_split do not go together (the leaky split has no "
                                 "training pieces to add renderings of)")


def _dist():
    """(rank, world_size, is_distributed)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _atomic_torch_save(obj, path: Path):
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _param_checksum(model) -> str:
    h = hashlib.sha1()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def macro_f1(y_true, y_pred, n):
    f1s = []
    for c in range(n):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def accuracy_ci95(piece_correct, window_hits, window_counts, *, seed: int = 0) -> dict:
    """95 % confidence intervals of piece and window accuracy, with the piece as the sampling unit.

    Piece accuracy: Wilson score interval of ``sum(piece_correct)`` of ``len(piece_correct)``.
    Window accuracy: percentile bootstrap over pieces (each resample draws whole pieces with all
    their windows: windows of one piece are not independent), 2000 resamples, seeded.
    Returns ``{"piece_accuracy": [lo, hi], "window_accuracy": [lo, hi]}``.
    """
    from scipy import stats

    k, n = int(np.sum(piece_correct)), len(piece_correct)
    if n == 0:
        return {"piece_accuracy": [0.0, 0.0], "window_accuracy": [0.0, 0.0]}
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    hits, counts = np.asarray(window_hits, float), np.asarray(window_counts, float)
    if n > 1 and np.ptp(hits / counts) > 0:
        b = stats.bootstrap((hits, counts), lambda h, c, axis=-1: h.sum(axis) / c.sum(axis), paired=True,
                            vectorized=True, n_resamples=2000, method="percentile", random_state=seed)
        w = [float(b.confidence_interval.low), float(b.confidence_interval.high)]
    else:  # every piece at the same accuracy: resampling pieces cannot move it
        w = [float(hits.sum() / counts.sum())] * 2
    return {"piece_accuracy": [float(ci.low), float(ci.high)], "window_accuracy": w}


def evaluate_windows(predict, wset: WindowSet, batch_size: int = 64) -> dict:
    """Window/piece accuracy with 95 % intervals (``ci95``, :func:`accuracy_ci95`), cross-entropy
    (``log_loss``), macro F1, per-class recall, confusion matrix.

    Parameters
    ----------
    predict : callable(np.ndarray [shape=(b, n_mels, frames)] log-mel) -> np.ndarray [shape=(b, n_classes)]
        Probabilities.
    """
    n = len(wset.labels)
    probs = np.zeros((len(wset), n), np.float64)
    for a in range(0, len(wset), batch_size):
        xb = np.stack([wset.window(j) for j in range(a, min(a + batch_size, len(wset)))])
        probs[a:a + len(xb)] = predict(xb)
    y = wset.y
    pred = probs.argmax(1)
    pieces = sorted(set(wset.piece_of))
    p_true, p_pred, p_hits, p_windows = [], [], [], []
    for pc in pieces:
        m = wset.piece_of == pc
        p_true.append(y[m][0])
        p_pred.append(probs[m].mean(0).argmax())
        p_hits.append(int((pred[m] == y[m]).sum()))
        p_windows.append(int(m.sum()))
    p_true, p_pred = np.array(p_true), np.array(p_pred)
    cm = np.zeros((n, n), np.int64)
    for t, p in zip(y, pred):
        cm[t, p] += 1
    per_class = {}
    for c, lab in enumerate(wset.labels):
        m = y == c
        pm = p_true == c
        per_class[lab] = {"window_recall": float((pred[m] == c).mean()) if m.any() else None,
                          "piece_recall": float((p_pred[pm] == c).mean()) if pm.any() else None,
                          "windows": int(m.sum()), "pieces": int(pm.sum())}
    return {
        "window_accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "log_loss": float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean()) if len(y) else 0.0,
        "piece_accuracy": float((p_pred == p_true).mean()) if len(p_true) else 0.0,
        "macro_f1": macro_f1(y, pred, n),
        "piece_macro_f1": macro_f1(p_true, p_pred, n),
        "ci95": accuracy_ci95(p_pred == p_true, p_hits, p_windows),
        "per_class": per_class,
        "n_pieces": len(pieces),
        "n_windows": int(len(y)),
        "confusion": cm.tolist(),
        "labels": list(wset.labels),
    }


def check_run_dirs(out_dir: Path, resume: bool, force: bool) -> Path:
    """Refuse to overwrite a bundle or an earlier run by accident; returns ``<out_dir>.train``."""
    work = out_dir.with_name(out_dir.name + ".train")
    if out_dir.exists() and not force:
        raise BundleError(f"{out_dir} exists; pass --force to overwrite it")
    if work.exists() and not resume and not force:
        raise BundleError(f"{work} holds an earlier run; pass --resume to continue it or --force to start over")
    return work


def resume_from(ckpt_path: Path, cfg, labels, net, opt, sched, ignore=()) -> dict:
    """Load a checkpoint made with the same settings (except ``ignore``) and labels; returns the state."""
    import torch

    if not ckpt_path.is_file():
        raise BundleError(f"--resume: no checkpoint in {ckpt_path.parent}")
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    same = {k: v for k, v in ck["config"].items() if k not in ignore}
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}
    if same != mine or ck["labels"] != labels:
        raise BundleError(f"--resume: {ckpt_path} was made with other settings or labels")
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optim"])
    sched.load_state_dict(ck["sched"])
    return json.loads(ck["state"])


def load_split_features(data_dir, work, items, seed, val_frac, test_frac, featurizer, mel_config, cache_dir,
                        progress):
    """Scan (unless ``items`` is given), split by piece, save the split in ``work`` (if not None),
    load the cached features. Returns ``(items, labels, split, by_set, feats, skipped)``."""
    items = items if items is not None else scan_dataset(data_dir)
    labels = sorted({it.label for it in items})
    split = split_pieces(items, seed, val_frac, test_frac)
    if work is not None:
        save_split(split, work / "split.json")
    by_set = {k: [it for it in items if it.piece in set(split[k])] for k in ("train", "val", "test")}
    cache = FeatureCache(data_dir, cache_dir or Path.home() / ".cache" / "tarab" / "features", featurizer, mel_config)
    feats, skipped = cache.load_all(items, progress=progress)
    if not feats:
        raise DataError(f"{data_dir}: no readable audio files")
    return items, labels, split, by_set, feats, skipped


def extra_training_items(extra_dir, split: dict, labels, *, other_pieces: bool = False) -> tuple[list, int]:
    """Items of ``extra_dir`` to add to the training set, with absolute paths so they never collide
    with the corpus's. Returns ``(items, n_ignored)``.

    By default ``extra_dir`` holds other renderings of the corpus's pieces (same piece ids): only
    the files of training pieces are kept, those of validation/test pieces are ignored. With
    ``other_pieces`` it holds pieces that are not in the corpus (``tarab rerender --other-pieces``):
    all are kept, and none may carry a corpus piece id.

    Raises
    ------
    DataError
        Not a data set, a composer the corpus does not have, a piece id not in the corpus (or, with
        ``other_pieces``, one that is).
    """
    extra = Path(extra_dir).resolve()
    items = scan_dataset(extra)
    unknown = sorted({it.label for it in items} - set(labels))
    if unknown:
        raise DataError(f"{extra}: composer folder(s) not in the training data: {', '.join(unknown)}")
    known = set(split["train"]) | set(split["val"]) | set(split["test"])
    if other_pieces:
        shared = sorted({it.piece for it in items} & known)
        if shared:
            raise DataError(f"{extra}: {len(shared)} piece id(s) of the training data itself, e.g. {shared[0]} "
                            f"(other pieces must be other pieces; renderings of the corpus's go to --extra-train)")
        return [Item(str(extra / it.path), it.label, it.piece) for it in items], 0
    stray = sorted({it.piece for it in items} - known)
    if stray:
        raise DataError(f"{extra}: {len(stray)} piece id(s) not in the training data (its manifest.csv must use the "
                        f"corpus's piece ids), e.g. {stray[0]}")
    train = set(split["train"])
    keep = [Item(str(extra / it.path), it.label, it.piece) for it in items if it.piece in train]
    return keep, len(items) - len(keep)


def add_extra_training(extra_dir, data_dir, split, labels, feats: dict, skipped: list, featurizer, mel_config,
                       cache_dir, progress, *, other_pieces: bool = False) -> list:
    """Load the features of ``extra_dir``'s training files (:func:`extra_training_items`) into
    ``feats`` (unreadable files appended to ``skipped``); return their items ([] when ``extra_dir``
    is empty)."""
    if not extra_dir:
        return []
    if Path(extra_dir).resolve() == Path(data_dir).resolve():
        raise DataError(f"{extra_dir}: the extra training data is the data set itself")
    items, n_ignored = extra_training_items(extra_dir, split, labels, other_pieces=other_pieces)
    cache = FeatureCache(data_dir, cache_dir or Path.home() / ".cache" / "tarab" / "features", featurizer, mel_config)
    extra_feats, extra_skipped = cache.load_all(items, progress=progress)
    feats.update(extra_feats)
    skipped += extra_skipped
    log.info("extra training data (%s): %d files used, %d of validation/test pieces ignored",
             "other pieces" if other_pieces else "renderings of training pieces", len(extra_feats), n_ignored)
    return [it for it in items if it.path in extra_feats]


def piece_facets(pieces) -> tuple[np.ndarray, list[list[str]]]:
    """Makam, form and usul of SymbTr piece ids (``makam--form--usul--title--composer``): an
    ``(n, 3)`` index array and the values of each facet, sorted."""
    parts = [str(p).split("--") for p in pieces]
    bad = [p for p, f in zip(pieces, parts) if len(f) < 5]
    if bad:
        raise DataError(f"aux_weight needs SymbTr piece ids (makam--form--usul--title--composer), got {bad[0]!r}")
    values = [sorted({f[k] for f in parts}) for k in range(3)]
    idx = np.array([[values[k].index(f[k]) for k in range(3)] for f in parts], np.int64).reshape(-1, 3)
    return idx, values


def card_config(cfg) -> dict:
    """A training config for a model card: its extra data sets by folder name, not by this machine's path."""
    d = dataclasses.asdict(cfg)
    for key in ("extra_train", "other_train"):
        if d.get(key):
            d[key] = Path(d[key]).name
    return d


def training_data_note(extra_items, other_items, extra_dir, other_dir) -> str:
    """The card's words for training data beyond the data set's training pieces ('' if none)."""
    note = ""
    if extra_items:
        note += f"; plus {len(extra_items)} other renderings of the training pieces ({Path(extra_dir).name})"
    if other_items:
        note += (f"; plus {len(other_items)} renderings of {len({i.piece for i in other_items})} pieces outside the "
                 f"corpus ({Path(other_dir).name})")
    return note


def band_stats(wset, seed: int, n: int = 400):
    """Per-band mean and std (torch tensors) of a deterministic subsample of training windows."""
    import torch

    rng = np.random.default_rng(seed)
    sample = np.stack([wset.window(j) for j in rng.choice(len(wset), min(len(wset), n), replace=False)])
    return torch.tensor(sample.mean(axis=(0, 2))), torch.tensor(sample.std(axis=(0, 2)) + 1e-3)


def train(data_dir, out_dir, *, featurizer, mel_config: dict, config: TrainConfig | None = None,
          cache_dir=None, resume: bool = False, force: bool = False, progress: bool = True,
          items=None) -> dict:
    """Train a classifier and export it as a bundle.

    Parameters
    ----------
    data_dir : path
        Folder-per-composer data set.
    out_dir : path
        Bundle directory to create. Training state lives in ``<out_dir>.train/`` (checkpoint
        each epoch, split, history); ``resume=True`` continues from it.
    featurizer : callable(y) -> mel power (n_mels, t)
    mel_config : dict
        ``sr, n_fft, hop_length, n_mels, fmin, fmax`` of the featurizer.
    config : TrainConfig
    items : list of Item, optional
        Use these instead of scanning ``data_dir`` (tests).

    Returns
    -------
    dict
        Test-split figures, timings and paths.
    """
    import torch
    import torch.nn.functional as F

    from .nets import ExportedClassifier, build_net, count_params

    cfg = config or TrainConfig()
    cfg.validate()
    rank, world, distributed = _dist()
    out_dir = Path(out_dir)
    work = check_run_dirs(out_dir, resume, force)
    if distributed:  # every rank has checked before rank 0 creates anything
        torch.distributed.barrier()
    if rank == 0:
        if work.exists() and force and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    if distributed:
        torch.distributed.barrier()

    iseed = cfg.init_seed if cfg.init_seed >= 0 else cfg.seed
    torch.manual_seed(iseed + rank)
    t_start = time.time()
    items, labels, split, by_set, feats, skipped = load_split_features(
        data_dir, work if rank == 0 else None, items, cfg.seed, cfg.val_frac, cfg.test_frac, featurizer, mel_config,
        cache_dir, progress and rank == 0)
    extra_items = add_extra_training(cfg.extra_train, data_dir, split, labels, feats, skipped, featurizer,
                                     mel_config, cache_dir, progress and rank == 0)
    other_items = add_extra_training(cfg.other_train, data_dir, split, labels, feats, skipped, featurizer,
                                     mel_config, cache_dir, progress and rank == 0, other_pieces=True)
    t_feats = time.time() - t_start
    if cfg.leaky_window_split:
        # The paper's protocol, for comparison only: windows of one piece land in train AND test.
        wall = WindowSet(items, feats, labels, cfg.window_frames, cfg.eval_hop_frames)
        perm = np.random.default_rng(cfg.seed).permutation(len(wall))
        n_te, n_va = int(cfg.test_frac * len(perm)), int(cfg.val_frac * len(perm))
        wtest, wval, wtrain = (wall.subset(perm[:n_te]), wall.subset(perm[n_te:n_te + n_va]),
                               wall.subset(perm[n_te + n_va:]))
    else:
        wtrain = WindowSet(by_set["train"] + extra_items + other_items, feats, labels, cfg.window_frames, cfg.train_hop_frames)
        wval = WindowSet(by_set["val"], feats, labels, cfg.window_frames, cfg.eval_hop_frames)
        wtest = WindowSet(by_set["test"], feats, labels, cfg.window_frames, cfg.eval_hop_frames)
    for name, ws in (("train", wtrain), ("validation", wval), ("test", wtest)):
        if len(ws) == 0:
            raise DataError(f"the {name} split has no windows")
    log.info("windows: train %d, val %d, test %d", len(wtrain), len(wval), len(wtest))

    mean, std = band_stats(wtrain, cfg.seed)

    n_mels = mel_config["n_mels"]
    net = build_net(cfg.arch, len(labels), n_mels, cfg.window_frames)
    aux_y = None
    if cfg.aux_weight > 0:
        if distributed or not hasattr(net, "head"):
            raise ParameterError("aux_weight: only for the compact and temporal networks, on one process")
        aux_y, facet_values = piece_facets(wtrain.piece_of)
        # part of the net while training (checkpoints and --resume carry them); removed before export
        net.aux = torch.nn.ModuleList([torch.nn.Linear(net.embed_dim, len(v)) for v in facet_values])
    model = net
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(net)
    if cfg.arch == "paper":  # the paper's L2 0.003 on the 128-unit layer
        groups = [{"params": [p for n, p in net.named_parameters() if not n.startswith("fc2.")], "weight_decay": 0.0},
                  {"params": list(net.fc2.parameters()), "weight_decay": 0.003 * 2}]
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, int(np.ceil((cfg.max_train_windows or len(wtrain)) / world / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                                                pct_start=0.15)
    class_w = torch.tensor(wtrain.class_weights())
    aug = Augmenter(mel_config["sr"], mel_config["n_fft"], n_mels, mel_config["fmin"], mel_config["fmax"],
                    max_semitones=cfg.pitch_shift_semitones, seed=iseed * 1000 + rank)
    mean_n, std_n = mean.numpy()[None, :, None], std.numpy()[None, :, None]

    state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0, "history": [],
             "train_seconds": 0.0}
    ckpt_path = work / "checkpoint.pt"
    best_path = work / "best.pt"
    if resume:
        state = resume_from(ckpt_path, cfg, labels, net, opt, sched, ignore=("time_budget_s",))
        log.info("resumed at epoch %d", state["epoch"])

    def predict_logmel(xb):
        with torch.no_grad():
            x = torch.from_numpy((xb - mean_n) / std_n).unsqueeze(1)
            return torch.softmax(net(x), -1).numpy()

    from tqdm import tqdm

    t_train0 = time.time() - state["train_seconds"]
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        net.train()
        aug.rng = np.random.default_rng([iseed, rank, epoch])  # a resumed run repeats the same draws
        torch.manual_seed(iseed * 100003 + epoch * 101 + rank)  # dropout, likewise
        perm = np.random.default_rng([iseed, epoch]).permutation(len(wtrain))
        if cfg.max_train_windows:
            perm = perm[: cfg.max_train_windows]
        perm = perm[rank::world]
        perm = perm[: steps_per_epoch * cfg.batch_size]
        tot, n_seen = 0.0, 0
        bar = tqdm(range(0, len(perm), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not progress or rank != 0, leave=False)
        for a in bar:
            idx = perm[a:a + cfg.batch_size]
            xs = []
            for j in idx:
                if cfg.augment:
                    L, _ = aug.source_length(cfg.window_frames)
                    w = wtrain.window(j, L, start_jitter=int(aug.rng.integers(-cfg.train_hop_frames // 2, cfg.train_hop_frames // 2 + 1)))
                    xs.append(aug(w, cfg.window_frames))
                else:
                    xs.append(wtrain.window(j))
            x = torch.from_numpy((np.stack(xs) - mean_n) / std_n).float().unsqueeze(1)
            y = torch.from_numpy(wtrain.y[idx])
            if aux_y is None:
                loss = F.cross_entropy(model(x), y, weight=class_w, label_smoothing=cfg.label_smoothing)
            else:
                emb = net.embed(x)
                loss = F.cross_entropy(net.head(net.dropout(emb)), y, weight=class_w, label_smoothing=cfg.label_smoothing)
                ay = torch.from_numpy(aux_y[idx])
                loss = loss + cfg.aux_weight * sum(F.cross_entropy(h(emb), ay[:, k]) for k, h in enumerate(net.aux)) / 3
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            tot += loss.item() * len(idx)
            n_seen += len(idx)
            bar.set_postfix(loss=f"{tot / max(n_seen, 1):.3f}")
        if distributed:  # BN running stats drift per rank after the last step: take rank 0's
            for buf in net.buffers():
                torch.distributed.broadcast(buf, 0)
        net.eval()
        val = evaluate_windows(predict_logmel, wval)
        val_loss = val["log_loss"]
        state["epoch"] = epoch + 1
        state["train_seconds"] = time.time() - t_train0
        rec = {"epoch": epoch + 1, "train_loss": tot / max(n_seen, 1), "val_loss": val_loss,
               "val_window_accuracy": val["window_accuracy"], "val_piece_accuracy": val["piece_accuracy"],
               "lr": float(opt.param_groups[0]["lr"]), "seconds": state["train_seconds"],
               "param_checksum": _param_checksum(net)}
        state["history"].append(rec)
        improved = val_loss < state["best_val_loss"] - 1e-4
        if improved:
            state.update(best_val_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        if rank == 0:
            if improved:
                _atomic_torch_save(net.state_dict(), best_path)
            _atomic_torch_save({"model": net.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                                "state": json.dumps(state), "config": dataclasses.asdict(cfg), "labels": labels},
                               ckpt_path)
            (work / "history.json").write_text(json.dumps(state["history"], indent=1) + "\n")
            log.info("epoch %d: train %.3f, val %.3f, val acc %.3f (piece %.3f)%s", epoch + 1, rec["train_loss"],
                     val_loss, val["window_accuracy"], val["piece_accuracy"], " *" if improved else "")
        (work / f"rank{rank}.json").write_text(json.dumps([h["param_checksum"] for h in state["history"]]))
        if distributed:
            torch.distributed.barrier()
        if state["bad_epochs"] >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        if cfg.time_budget_s and state["train_seconds"] >= cfg.time_budget_s:
            log.info("time budget of %.0f s reached after epoch %d", cfg.time_budget_s, epoch + 1)
            break

    if distributed:
        torch.distributed.barrier()
    if rank != 0:
        torch.distributed.destroy_process_group()
        return {"rank": rank}
    if best_path.is_file():
        net.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
    if aux_y is not None:
        del net.aux
    net.eval()
    test = evaluate_windows(predict_logmel, wtest)
    exported = ExportedClassifier(net, labels, mean, std).eval()
    from .bundle import quiet_jit

    with quiet_jit():
        scripted = torch.jit.script(exported)
    probe = torch.rand(3, n_mels, cfg.window_frames) * 1e-2
    with torch.no_grad():
        ref = exported(probe)
        got = scripted(probe)
    if not torch.allclose(ref, got, atol=1e-5):
        raise BundleError("export check failed: the TorchScript model's outputs differ from the eager model's")
    with quiet_jit():
        scripted = torch.jit.freeze(scripted, preserved_attrs=["embed", "get_labels"])
    n_params = count_params(net)
    train_s = state["train_seconds"]
    card = Card(
        kind="classifier", name=f"{Path(data_dir).name}-{cfg.arch}", labels=labels,
        sr=int(mel_config["sr"]), n_fft=int(mel_config["n_fft"]), hop_length=int(mel_config["hop_length"]),
        n_mels=int(n_mels), fmin=float(mel_config["fmin"]),
        fmax=None if mel_config["fmax"] is None else float(mel_config["fmax"]),
        window_frames=cfg.window_frames,
        training_data=(f"{Path(data_dir).name}: {len(items)} files, {len(labels)} composers; "
                       + ("LEAKY window-level split (comparison only; windows of a piece in train and test)"
                          if cfg.leaky_window_split else
                          f"piece-level split (seed {cfg.seed}): {len(split['train'])} train / "
                          f"{len(split['val'])} validation / {len(split['test'])} test pieces"
                          + training_data_note(extra_items, other_items, cfg.extra_train, cfg.other_train))),
        licence=SYMBTR_LICENCE,
        metrics={"test": {k: test[k] for k in ("window_accuracy", "piece_accuracy", "macro_f1", "n_pieces", "n_windows")},
                 "params": n_params, "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
                 "train_seconds": round(train_s, 1), "feature_seconds": round(t_feats, 1), "world_size": world},
        extra={"arch": cfg.arch, "config": card_config(cfg), "skipped_files": [p for p, _ in skipped]},
    )
    save_bundle(scripted, card, out_dir, force=force,
                extra_files={"split.json": (work / "split.json").read_bytes(),
                             "history.json": (work / "history.json").read_bytes(),
                             "test_metrics.json": (json.dumps(test, indent=1) + "\n").encode()})
    if distributed:
        torch.distributed.destroy_process_group()
    return {"bundle": str(out_dir), "test": test, "params": n_params, "train_seconds": train_s,
            "feature_seconds": t_feats, "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
            "classes": describe(items), "skipped": skipped, "train_windows": len(wtrain),
            "extra_train_files": len(extra_items), "other_train_files": len(other_items)}
