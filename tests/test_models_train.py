"""Data pipeline and training on synthetic composers: splits, bad input, export, resume, DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_cli
from models.bundle import load_bundle
from models.data import FeatureCache, WindowSet, scan_dataset, split_pieces
from models.errors import BundleError, DataError
from models.train import TrainConfig, accuracy_ci95, train
from realtime.mel import StreamingMel
from synth import make_dataset

TINY = dict(arch="compact", epochs=2, batch_size=8, window_frames=32, train_hop_frames=16, eval_hop_frames=16, patience=5,
            val_frac=0.25, test_frac=0.25)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def mel():
    return StreamingMel()


def _train(dataset, out, mel, cache, **kw):
    cfg = TrainConfig(**{**TINY, **kw.pop("cfg", {})})
    return train(dataset, out, featurizer=mel.transform, mel_config=mel.config, config=cfg, cache_dir=cache,
                 progress=False, **kw)


def test_split_is_by_piece_stratified_and_deterministic(dataset):
    items = scan_dataset(dataset)
    a, b = split_pieces(items, 0, 0.25, 0.25), split_pieces(items, 0, 0.25, 0.25)
    assert a == b and split_pieces(items, 1, 0.25, 0.25) != a
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == 12
    for s in sets:  # every composer in every set
        assert {p.split("_")[0] for p in s} == {"alpha", "beta", "gamma"}


def test_corpus_split_is_by_piece(corpus):
    items = scan_dataset(corpus)
    assert len(items) == 234 and len({i.label for i in items}) == 8
    split = split_pieces(items, 0, 0.2, 0.2)
    tr, va, te = (set(split[k]) for k in ("train", "val", "test"))
    assert not (tr & te) and not (tr & va) and not (va & te)
    # windows of a piece never straddle sets: every window's piece is in exactly one set
    assert len(tr) + len(va) + len(te) == len({i.piece for i in items})


def test_bad_data_dirs(tmp_path, dataset):
    with pytest.raises(DataError, match="not a directory"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no composer folders"):
        scan_dataset(tmp_path)
    one = make_dataset(tmp_path / "one", pieces=3, styles=["alpha"])
    with pytest.raises(DataError, match="only one composer"):
        scan_dataset(one)
    empty = make_dataset(tmp_path / "empty", pieces=3, styles=["alpha", "beta"])
    (empty / "gamma").mkdir()
    with pytest.raises(DataError, match="without audio files: gamma"):
        scan_dataset(empty)
    few = make_dataset(tmp_path / "few", pieces=3, styles=["alpha", "beta"])
    for f in list((few / "beta").iterdir())[1:]:
        f.unlink()
    with pytest.raises(DataError, match="beta has 1"):
        split_pieces(scan_dataset(few))


def test_feature_cache_uses_streaming_mel_and_skips_unreadable(tmp_path, dataset, mel, caplog):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    (d / "alpha" / "broken.wav").write_bytes(b"RIFF....garbage")
    items = scan_dataset(d)
    fc = FeatureCache(d, tmp_path / "cache", mel.transform, mel.config)
    feats, skipped = fc.load_all(items, progress=False)
    assert [p for p, _ in skipped] == ["alpha/broken.wav"]
    assert "skipped 1 unreadable file(s): alpha/broken.wav" in caplog.text
    it = next(i for i in items if i.path == "beta/beta_0.wav")
    import soundfile as sf

    y, _ = sf.read(d / it.path, dtype="float32")
    ref = 10 * np.log10(np.maximum(mel.transform(y), 1e-10))
    np.testing.assert_allclose(feats[it.path].astype(np.float32), ref, atol=0.05)
    mtime = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")}
    fc.load_all(items, progress=False)  # second pass reads the cache
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")} == mtime
    ws = WindowSet([i for i in items if i.path in feats], feats, ["alpha", "beta", "gamma"], 32, 16)
    assert len(ws) > 0 and ws.window(0).shape == (128, 32)


def test_accuracy_intervals():
    # piece accuracy: the Wilson score interval, against its formula
    k, n, z = 18, 47, 1.959963984540054
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    ci = accuracy_ci95([True] * k + [False] * (n - k), [1] * n, [1] * n)
    np.testing.assert_allclose(ci["piece_accuracy"], [centre - half, centre + half], rtol=1e-9)
    # window accuracy, resampled by piece: pieces that all agree leave no doubt ...
    assert accuracy_ci95([True] * 10, [7] * 10, [10] * 10)["window_accuracy"] == [0.7, 0.7]
    # ... pieces that are all right or all wrong are 10 observations, not 300 windows
    hits, counts = [30] * 5 + [0] * 5, [30] * 10
    lo, hi = accuracy_ci95([True] * 5 + [False] * 5, hits, counts)["window_accuracy"]
    assert lo < 0.5 < hi and hi - lo > 0.4
    lo2, hi2 = accuracy_ci95([True] * 5 + [False] * 5, [15] * 10, counts)["window_accuracy"]
    assert lo2 == hi2 == 0.5
    again = accuracy_ci95([True] * 5 + [False] * 5, hits, counts)["window_accuracy"]
    assert again == [lo, hi]  # seeded


def test_temporal_arch_learns_the_synthetic_styles(tmp_path, dataset, mel):
    """The shipped architecture (1-D convolutions over time) trains, exports and scripts like the others."""
    res = _train(dataset, tmp_path / "t", mel, tmp_path / "cache", cfg=dict(arch="temporal", epochs=30, patience=30))
    b = load_bundle(tmp_path / "t", kind="classifier")
    assert b.card.name.endswith("-temporal") and b.card.extra["arch"] == "temporal"
    assert res["test"]["window_accuracy"] > 0.5


def test_train_export_and_refusals(tmp_path, dataset, mel):
    out = tmp_path / "bundle"
    res = _train(dataset, out, mel, tmp_path / "cache", cfg=dict(epochs=8))
    b = load_bundle(out, kind="classifier")
    assert b.card.labels == ["alpha", "beta", "gamma"] and b.card.window_frames == 32
    assert "CC BY-NC-SA" in b.card.licence and b.card.metrics["test"]["n_pieces"] == 3
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    assert res["test"]["window_accuracy"] > 0.5  # the synthetic styles are easy
    with pytest.raises(BundleError, match="exists"):
        _train(dataset, out, mel, tmp_path / "cache")
    import shutil

    shutil.rmtree(out)
    with pytest.raises(BundleError, match="earlier run"):
        _train(dataset, out, mel, tmp_path / "cache")


def test_aux_heads_learn_facets_and_are_not_exported(tmp_path, dataset, mel):
    import csv
    import shutil

    import torch

    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="SymbTr piece ids"):  # file stems are not makam--form--usul--...
        _train(dataset, tmp_path / "x", mel, cache, cfg=dict(epochs=1, aux_weight=1.0))
    data = tmp_path / "symbtr-like"
    shutil.copytree(dataset, data)
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "piece"])
        for it in scan_dataset(dataset):  # the form follows the piece number, not the composer
            i = int(it.piece.rsplit("_", 1)[1])
            w.writerow([it.path, f"hicaz--form{i % 2}--usul{i % 3}--title{i}--{it.label}"])
    base = _train(data, tmp_path / "a", mel, cache, cfg=dict(epochs=2))
    res = _train(data, tmp_path / "b", mel, cache, cfg=dict(epochs=2, aux_weight=1.0))
    assert res["params"] == base["params"]  # the heads are gone from the bundle ...
    b = load_bundle(tmp_path / "b", kind="classifier")
    assert b.card.extra["config"]["aux_weight"] == 1.0
    assert not any("aux" in n for n, _ in b.module.named_parameters())
    ck = torch.load(tmp_path / "b.train" / "checkpoint.pt", weights_only=True)  # ... and in the checkpoint
    assert [ck["model"][f"aux.{k}.weight"].shape[0] for k in range(3)] == [1, 2, 3]  # makam, form, usul values
    hist = json.loads((tmp_path / "b" / "history.json").read_text())
    assert hist[-1]["train_loss"] > json.loads((tmp_path / "a" / "history.json").read_text())[-1]["train_loss"]


def test_resume_continues_where_it_stopped(tmp_path, dataset, mel):
    cache = tmp_path / "cache"
    _train(dataset, tmp_path / "full", mel, cache, cfg=dict(epochs=2))
    _train(dataset, tmp_path / "part", mel, cache, cfg=dict(epochs=2, time_budget_s=1e-9))  # stops after epoch 1
    hist = json.loads((tmp_path / "part.train" / "history.json").read_text())
    assert len(hist) == 1
    import shutil

    shutil.rmtree(tmp_path / "part")
    # a killed run resumes from its last checkpoint and ends where an uninterrupted run ends
    res = _train(dataset, tmp_path / "part", mel, cache, cfg=dict(epochs=2), resume=True)
    hist = json.loads((tmp_path / "part.train" / "history.json").read_text())
    full_hist = json.loads((tmp_path / "full" / "history.json").read_text())
    assert [h["param_checksum"] for h in hist] == [h["param_checksum"] for h in full_hist]
    assert res["epochs_run"] == 2


def test_cli_train_bad_input(tmp_path, dataset):
    r = run_cli("train", tmp_path / "missing", "-o", tmp_path / "b")
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", dataset, "-o", tmp_path / "b", "--arch", "resnet")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    (tmp_path / "exists").mkdir()
    r = run_cli("train", dataset, "-o", tmp_path / "exists")
    assert r.returncode == 2 and "--force" in r.stderr


def test_ddp_two_processes(tmp_path, dataset):
    """torchrun with 2 CPU processes (gloo): ranks stay in step and rank 0 exports a bundle."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "realtime.cli",
           "train", str(dataset), "-o", str(out), "--epochs", "2", "--window-frames", "32", "--batch-size", "8",
           "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--json"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    work = tmp_path / "ddp.train"
    c0 = json.loads((work / "rank0.json").read_text())
    c1 = json.loads((work / "rank1.json").read_text())
    assert len(c0) == 2 and c0 == c1
    b = load_bundle(out)
    assert b.card.metrics["world_size"] == 2
