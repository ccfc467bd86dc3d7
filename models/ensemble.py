"""Classifier bundles trained on the same piece split, averaged into one bundle.

Members differ only in their initialisation seed (``tarab train --init-seed``): the split, the
features and the labels must be the same, or the ensemble's test pieces would have been seen by
one of its members. The ensemble is an ordinary classifier bundle: ``forward`` returns the mean of
the members' probabilities, ``embed`` the members' embeddings side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import torch
from torch import nn

from .bundle import Bundle, Card, load_bundle, quiet_jit, save_bundle
from .errors import BundleError


class EnsembleClassifier(nn.Module):
    """Mean of the probabilities of several TorchScript classifiers with the same labels and features."""

    def __init__(self, members: list, labels: List[str]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.labels: List[str] = list(labels)

    def forward(self, S):
        p = torch.zeros(S.shape[0], len(self.labels), dtype=S.dtype)
        for m in self.members:
            p = p + m(S)
        return p / len(self.members)

    @torch.jit.export
    def embed(self, S):
        """The members' penultimate features, concatenated."""
        return torch.cat([m.embed(S) for m in self.members], dim=1)

    @torch.jit.export
    def get_labels(self) -> List[str]:
        return self.labels


def _same(bundles: List[Bundle], what: str, get) -> None:
    ref = get(bundles[0])
    for b in bundles[1:]:
        if get(b) != ref:
            raise BundleError(f"{b.path} and {bundles[0].path} differ in their {what}: the members of an ensemble "
                              f"must share it")


def ensemble_bundles(paths, out_dir, data_dir, *, featurizer_for, cache_dir=None, force: bool = False,
                     progress: bool = True) -> dict:
    """Write one classifier bundle that averages the bundles at ``paths``.

    The ensemble is evaluated on the test pieces of the members' split in ``data_dir`` (their
    data set) before it is written, and its card carries those figures next to each member's.
    ``featurizer_for(mel_config)`` returns ``(featurizer, mel_config)`` for the members' features.

    Raises
    ------
    BundleError
        Fewer than two members, a member that is not a classifier, members that differ in labels,
        features, window length or piece split, or ``out_dir`` existing without ``force``.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise BundleError(f"an ensemble needs at least 2 bundles, got {len(paths)}")
    if len({p.resolve() for p in paths}) != len(paths):
        raise BundleError("the same bundle is named twice")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:  # before loading anything
        raise BundleError(f"{out_dir} exists; pass --force to overwrite it")
    bundles = [load_bundle(p, kind="classifier") for p in paths]
    _same(bundles, "labels", lambda b: b.card.labels)
    _same(bundles, "mel features", lambda b: b.card.mel_config())
    _same(bundles, "window length", lambda b: b.card.window_frames)

    def split_of(b):
        f = b.path / "split.json"
        if not f.is_file():
            raise BundleError(f"{b.path}: no split.json (an ensemble is only made of members trained on one split)")
        return json.loads(f.read_text())

    _same(bundles, "piece split (split.json)", split_of)
    first = bundles[0].card
    ens = EnsembleClassifier([b.module for b in bundles], first.labels).eval()
    with quiet_jit():
        scripted = torch.jit.script(ens)
    probe = torch.rand(3, first.n_mels, first.window_frames) * 1e-2
    with torch.no_grad():
        want = torch.stack([b.module(probe) for b in bundles]).mean(0)
        got = scripted(probe)
    if not torch.allclose(want, got, atol=1e-6):
        raise BundleError("export check failed: the ensemble's outputs differ from the mean of its members'")
    from .evaluate import evaluate_bundle

    featurizer, mel_config = featurizer_for(first.mel_config())
    test = evaluate_bundle(Bundle(scripted, first, bundles[0].path), data_dir, featurizer=featurizer,
                           mel_config=mel_config, cache_dir=cache_dir, progress=progress)
    members = [{"bundle": p.name, "name": b.card.name, "init_seed": b.card.extra.get("config", {}).get("init_seed"),
                "test": b.card.metrics.get("test"), "params": b.card.metrics.get("params")}
               for p, b in zip(paths, bundles)]
    params = sum(m["params"] or 0 for m in members)
    d = {k: v for k, v in first.to_dict().items() if k not in ("date_created", "tarab_version", "torch_version")}
    d.update(name=f"{first.name}-x{len(bundles)}",
             training_data=f"{len(bundles)} members trained on the same data and split; member 1: {first.training_data}",
             metrics={"test": {k: test[k] for k in ("window_accuracy", "piece_accuracy", "macro_f1", "n_pieces",
                                                    "n_windows")},
                      "params": params, "members": members},
             extra={"arch": "ensemble", "members": len(bundles), "member_arch": first.extra.get("arch"),
                    "config": first.extra.get("config", {})})
    card = Card(**d)
    extra_files = {"split.json": (bundles[0].path / "split.json").read_bytes(),
                   "test_metrics.json": (json.dumps(test, indent=1) + "\n").encode()}
    save_bundle(scripted, card, out_dir, force=force, extra_files=extra_files)
    return {"bundle": str(out_dir), "test": test, "members": members, "params": params}
