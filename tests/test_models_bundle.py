"""Bundle format: save → load round trip, and refusal of corrupt or mismatched bundles."""

import json

import pytest
import torch

from models.bundle import CARD_FILE, MODEL_FILE, Card, load_bundle, save_bundle
from models.errors import BundleError
from models.nets import CompactNet, ExportedClassifier


def _card(**kw):
    d = dict(kind="classifier", name="tiny", labels=["a", "b", "c"], sr=22050, n_fft=2048, hop_length=512,
             n_mels=128, fmin=0.0, fmax=None, window_frames=32, training_data="synthetic", licence="MIT")
    d.update(kw)
    return Card(**d)


@pytest.fixture
def scripted():
    torch.manual_seed(0)
    m = ExportedClassifier(CompactNet(3, widths=(8, 8, 8, 8)), ["a", "b", "c"], torch.zeros(128), torch.ones(128)).eval()
    return m, torch.jit.script(m)


def test_roundtrip(tmp_path, scripted):
    eager, sm = scripted
    p = save_bundle(sm, _card(), tmp_path / "b", extra_files={"notes.txt": b"hi"})
    b = load_bundle(p, kind="classifier")
    assert b.card.labels == ["a", "b", "c"] and b.card.torch_version == torch.__version__
    x = torch.rand(2, 128, 32)
    torch.testing.assert_close(b.module(x), eager(x))
    assert b.module.get_labels() == ["a", "b", "c"]
    assert (p / "notes.txt").read_bytes() == b"hi"
    card = json.loads((p / CARD_FILE).read_text())
    assert len(card["sha256"]) == 64


def test_refuses_existing_without_force(tmp_path, scripted):
    save_bundle(scripted[1], _card(), tmp_path / "b")
    with pytest.raises(BundleError, match="exists"):
        save_bundle(scripted[1], _card(), tmp_path / "b")
    save_bundle(scripted[1], _card(name="again"), tmp_path / "b", force=True)
    assert load_bundle(tmp_path / "b").card.name == "again"


def test_corrupt_model_file(tmp_path, scripted):
    p = save_bundle(scripted[1], _card(), tmp_path / "b")
    data = bytearray((p / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (p / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(p)


def test_card_problems(tmp_path, scripted):
    p = save_bundle(scripted[1], _card(), tmp_path / "b")
    good = json.loads((p / CARD_FILE).read_text())
    cases = [
        ({k: v for k, v in good.items() if k != "labels"}, "missing field"),
        ({**good, "colour": "red"}, "unknown field"),
        ({**good, "sr": "22050"}, "type"),
        ({**good, "kind": "vocoder"}, "kind"),
        ({**good, "n_mels": 0}, "must be > 0"),
        ({**good, "labels": ["x", "y", "z"]}, "differs from the card embedded"),
        ({k: v for k, v in good.items() if k != "sha256"}, "sha256"),
    ]
    for card, match in cases:
        (p / CARD_FILE).write_text(json.dumps(card))
        with pytest.raises(BundleError, match=match):
            load_bundle(p)
    (p / CARD_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="JSON"):
        load_bundle(p)


def test_wrong_kind_and_missing(tmp_path, scripted):
    p = save_bundle(scripted[1], _card(), tmp_path / "b")
    with pytest.raises(BundleError, match="expected a generator"):
        load_bundle(p, kind="generator")
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nope")
    (p / MODEL_FILE).unlink()
    with pytest.raises(BundleError, match="no model.ts"):
        load_bundle(p)


def test_not_torchscript(tmp_path, scripted):
    p = save_bundle(scripted[1], _card(), tmp_path / "b")
    (p / MODEL_FILE).write_bytes(b"not a zip file")
    card = json.loads((p / CARD_FILE).read_text())
    import hashlib

    card["sha256"] = hashlib.sha256(b"not a zip file").hexdigest()
    (p / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="not a loadable TorchScript"):
        load_bundle(p)


def test_mel_config_mismatch():
    c = _card()
    c.check_mel_config(sr=22050, n_fft=2048, hop_length=512, n_mels=128, fmin=0.0, fmax=11025.0)
    with pytest.raises(BundleError, match="n_mels: bundle 128, engine 64"):
        c.check_mel_config(sr=22050, n_fft=2048, hop_length=512, n_mels=64, fmin=0.0, fmax=None)
