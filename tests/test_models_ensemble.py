"""Ensembles of classifiers trained on one split with different initialisation seeds."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from models.bundle import load_bundle
from models.data import FeatureCache, WindowSet, scan_dataset
from models.errors import BundleError
from models.train import TrainConfig, train
from realtime.mel import StreamingMel
from synth import make_dataset

TINY = dict(arch="temporal", epochs=3, batch_size=8, window_frames=32, train_hop_frames=16, eval_hop_frames=16,
            val_frac=0.25, test_frac=0.25)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    data = make_dataset(root / "data", pieces=4, seconds=6.0)
    sm = StreamingMel()
    common = dict(featurizer=sm.transform, mel_config=sm.config, cache_dir=root / "cache", progress=False)
    for name, kw in (("m0", {}), ("m1", dict(init_seed=1)), ("other_split", dict(seed=1))):
        train(data, root / name, config=TrainConfig(**TINY, **kw), **common)
    return data, root


def _probs(bundle_dir, data):
    b = load_bundle(bundle_dir, kind="classifier")
    items = scan_dataset(data)
    sm = StreamingMel()
    feats, _ = FeatureCache(data, bundle_dir.parent / "cache", sm.transform, sm.config).load_all(items, progress=False)
    ws = WindowSet(items, feats, b.card.labels, b.card.window_frames, 16)
    x = torch.from_numpy(10.0 ** (np.stack([ws.window(i) for i in range(0, len(ws), 7)]) / 10.0)).float()
    with torch.inference_mode():
        return b.module(x).numpy(), b.module.embed(x).numpy()


def test_init_seed_keeps_the_split_and_changes_the_weights(members):
    data, root = members
    split = [json.loads((root / m / "split.json").read_text()) for m in ("m0", "m1", "other_split")]
    assert split[0] == split[1] and split[0]["test"] != split[2]["test"]
    assert load_bundle(root / "m1").card.extra["config"]["init_seed"] == 1
    assert not np.allclose(_probs(root / "m0", data)[0], _probs(root / "m1", data)[0], atol=1e-3)


def test_ensemble_is_the_mean_of_its_members_and_evaluated_on_their_split(members, tmp_path):
    data, root = members
    out = tmp_path / "ens"
    r = run_cli("ensemble", data, root / "m0", root / "m1", "-o", out, "--cache-dir", root / "cache", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    b = load_bundle(out, kind="classifier")
    assert b.card.extra["arch"] == "ensemble" and b.card.extra["members"] == 2
    assert (out / "split.json").read_text() == (root / "m0" / "split.json").read_text()
    (p0, e0), (p1, e1), (pe, ee) = (_probs(d, data) for d in (root / "m0", root / "m1", out))
    np.testing.assert_allclose(pe, (p0 + p1) / 2, atol=1e-6)
    np.testing.assert_allclose(ee, np.concatenate([e0, e1], axis=1), atol=1e-6)
    # the card's test figures are those of `tarab evaluate` on the saved bundle
    ev = run_cli("evaluate", data, "--model", out, "--cache-dir", root / "cache", "--json")
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout)
    for k in ("window_accuracy", "piece_accuracy", "macro_f1", "n_pieces", "n_windows"):
        assert got[k] == pytest.approx(b.card.metrics["test"][k]) == pytest.approx(summary.get(k, got[k]))
    for k in ("piece_accuracy", "window_accuracy"):  # with its 95 % interval
        lo, hi = got["ci95"][k]
        assert 0 <= lo <= got[k] <= hi <= 1
    assert got["ci95"]["piece_accuracy"][1] > got["ci95"]["piece_accuracy"][0]  # Wilson: never a point
    assert [m["bundle"] for m in b.card.metrics["members"]] == ["m0", "m1"]
    # the engine takes it like any classifier bundle
    wav = next((data / "alpha").iterdir())
    c = run_cli("classify", wav, "--model", out, "--json")
    assert c.returncode == 0, c.stderr
    assert set(json.loads(c.stdout)["probabilities"]) == {"alpha", "beta", "gamma"}


def test_ensemble_refusals(members, tmp_path):
    from models.ensemble import ensemble_bundles
    from realtime.commands import featurizer_for

    data, root = members
    r = run_cli("ensemble", data, root / "m0", root / "other_split", "-o", tmp_path / "x")  # the CLI's message
    assert r.returncode != 0 and "piece split" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    kw = dict(featurizer_for=featurizer_for, cache_dir=root / "cache", progress=False)
    for bad, match in (([root / "m0"], "at least 2"), ([root / "m0", root / "m0"], "twice"),
                       ([root / "m0", tmp_path / "nope"], "nope")):
        with pytest.raises(BundleError, match=match):
            ensemble_bundles(bad, tmp_path / "x", data, **kw)
        assert not (tmp_path / "x").exists()
    with pytest.raises(BundleError, match="exists.*--force"):
        ensemble_bundles([root / "m0", root / "m1"], root / "m1", data, **kw)
    assert load_bundle(root / "m1").card.extra["arch"] == "temporal"  # untouched
