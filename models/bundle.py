"""Model bundles: a TorchScript file plus a JSON card that describes it.

A bundle is a directory::

    NAME/
        model.ts     TorchScript module (the card is also embedded as ``card.json`` extra file)
        card.json    the card, plus ``sha256`` of ``model.ts``

The loader checks that the card is complete and typed, that ``model.ts`` hashes to the
card's ``sha256``, and that the card embedded in the TorchScript file equals the sidecar.
A bundle that fails any check is refused with a :class:`~models.errors.BundleError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

__all__ = ["Card", "Bundle", "save_bundle", "load_bundle", "MODEL_FILE", "CARD_FILE", "PRETRAINED_DIR"]

MODEL_FILE = "model.ts"
CARD_FILE = "card.json"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
KINDS = ("classifier", "generator")


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tarab_version() -> str:
    try:
        from importlib.metadata import version

        return version("tarab")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


@dataclass(frozen=True)
class Card:
    """What a bundle is: its kind, labels, audio/feature configuration and provenance.

    Parameters
    ----------
    kind : {'classifier', 'generator'}
    name : str
        Short model name, e.g. ``'symbtr8-temporal'``.
    labels : list of str
        Class (composer) names in output order.
    sr : int
        Sample rate of the features [Hz].
    n_fft, hop_length, n_mels : int
        Mel-spectrogram parameters (librosa names), ``center=False``, ``power=2``.
    fmin : float
        Lowest mel frequency [Hz].
    fmax : float or None
        Highest mel frequency [Hz]; None means ``sr / 2``.
    window_frames : int
        Number of mel frames the model takes per window.
    training_data : str
        What the model was trained on (data set, split).
    licence : str
        Licence of the weights (a model trained on SymbTr is CC BY-NC-SA 4.0).
    metrics : dict
        Evaluation figures (free form, JSON-serialisable).
    extra : dict
        Architecture-specific settings (free form, JSON-serialisable).
    """

    kind: str
    name: str
    labels: list
    sr: int
    n_fft: int
    hop_length: int
    n_mels: int
    fmin: float
    fmax: float | None
    window_frames: int
    training_data: str
    licence: str
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    tarab_version: str = field(default_factory=tarab_version)
    torch_version: str = ""
    date_created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    # ---- validation ---------------------------------------------------------------------
    _TYPES = {
        "kind": str, "name": str, "labels": list, "sr": int, "n_fft": int, "hop_length": int,
        "n_mels": int, "fmin": (int, float), "fmax": (int, float, type(None)), "window_frames": int,
        "training_data": str, "licence": str, "metrics": dict, "extra": dict, "tarab_version": str,
        "torch_version": str, "date_created": str,
    }

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "card") -> "Card":
        """Build a card from a JSON dict, refusing missing, unknown or mistyped fields."""
        if not isinstance(d, dict):
            raise BundleError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k != "sha256"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BundleError(f"{source}: unknown field(s) {unknown}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise BundleError(f"{source}: missing field(s) {missing}")
        for k, v in d.items():
            t = cls._TYPES[k]
            if isinstance(v, bool) or not isinstance(v, t):
                raise BundleError(f"{source}: field {k!r} has type {type(v).__name__}, expected {t}")
        if d["kind"] not in KINDS:
            raise BundleError(f"{source}: kind {d['kind']!r} is not one of {KINDS}")
        if not d["labels"] or not all(isinstance(x, str) for x in d["labels"]):
            raise BundleError(f"{source}: labels must be a non-empty list of strings")
        for k in ("sr", "n_fft", "hop_length", "n_mels", "window_frames"):
            if d[k] <= 0:
                raise BundleError(f"{source}: field {k!r} must be > 0, got {d[k]}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def mel_config(self) -> dict:
        """The feature parameters, in librosa names."""
        return {"sr": self.sr, "n_fft": self.n_fft, "hop_length": self.hop_length,
                "n_mels": self.n_mels, "fmin": float(self.fmin),
                "fmax": None if self.fmax is None else float(self.fmax)}

    def check_mel_config(self, **mel) -> None:
        """Refuse a feature configuration that differs from the one the model was trained on.

        Raises
        ------
        BundleError
            Naming each mismatched parameter with the bundle's and the engine's value.
        """
        mine = self.mel_config()
        bad = []
        for k, v in mel.items():
            if k not in mine:
                raise BundleError(f"unknown mel parameter {k!r}")
            ref = mine[k]
            if k == "fmax":
                v = None if v is None or float(v) >= self.sr / 2 else float(v)
                ref = None if ref is None or ref >= self.sr / 2 else ref
            if v != ref:
                bad.append(f"{k}: bundle {ref!r}, engine {v!r}")
        if bad:
            raise BundleError(f"bundle {self.name!r} was made for other features ({'; '.join(bad)})")


@dataclass
class Bundle:
    """A loaded bundle: the TorchScript module and its card."""

    module: Any
    card: Card
    path: Path


@contextlib.contextmanager
def quiet_jit():
    """Silence torch's DeprecationWarning for TorchScript (still the format nn~-style hosts load)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        yield


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(scripted, card: Card, out_dir, *, force: bool = False, extra_files: dict | None = None) -> Path:
    """Write ``scripted`` (a ``torch.jit.ScriptModule``) and ``card`` as a bundle directory.

    ``extra_files`` maps file names to bytes written beside them (split, history, plots).

    The bundle is written into a temporary directory beside ``out_dir``, reloaded and checked,
    then renamed into place, so ``out_dir`` is complete or absent.

    Raises
    ------
    BundleError
        If ``out_dir`` exists and ``force`` is False.
    """
    import torch

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise BundleError(f"{out_dir} exists; pass --force to overwrite it")
    card = dataclasses.replace(card, torch_version=torch.__version__)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the bundle gets the user's usual mode
    try:
        model_path = tmp / MODEL_FILE
        with quiet_jit():
            torch.jit.save(scripted, str(model_path), _extra_files={CARD_FILE: card.to_json()})
        d = card.to_dict()
        d["sha256"] = _sha256(model_path)
        (tmp / CARD_FILE).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            if name in (MODEL_FILE, CARD_FILE) or "/" in name:
                raise BundleError(f"extra file name {name!r} not allowed")
            (tmp / name).write_bytes(data)
        load_bundle(tmp)  # refuse to publish a bundle that does not load
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_bundle(path=None, *, kind: str | None = None) -> Bundle:
    """Load and verify a bundle directory.

    Parameters
    ----------
    path : str or Path or None
        Bundle directory (or its ``card.json``/``model.ts``). None loads the shipped bundle
        ``models/pretrained/<kind>``.
    kind : {'classifier', 'generator'} or None
        Refuse a bundle of another kind.

    Raises
    ------
    BundleError
        Missing files, bad JSON, missing/unknown/mistyped card fields, hash mismatch,
        a TorchScript file that does not load, or an embedded card that differs.
    """
    import torch

    if path is None:
        if kind is None:
            raise BundleError("load_bundle: give a path or a kind")
        path = PRETRAINED_DIR / kind
    path = Path(path)
    if path.is_file() and path.name in (MODEL_FILE, CARD_FILE):
        path = path.parent
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    card_path, model_path = path / CARD_FILE, path / MODEL_FILE
    for p in (card_path, model_path):
        if not p.is_file():
            raise BundleError(f"{path}: bundle has no {p.name}")
    try:
        raw = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{card_path}: not a readable JSON card ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sha256"), str):
        raise BundleError(f"{card_path}: card has no sha256 of {MODEL_FILE}")
    card = Card.from_dict(raw, source=str(card_path))
    digest = _sha256(model_path)
    if digest != raw["sha256"]:
        raise BundleError(f"{model_path}: sha256 {digest[:12]}… does not match the card's "
                          f"{raw['sha256'][:12]}… (corrupt or replaced model file)")
    if kind is not None and card.kind != kind:
        raise BundleError(f"{path}: is a {card.kind} bundle, expected a {kind}")
    extra = {CARD_FILE: ""}
    try:
        with quiet_jit():
            module = torch.jit.load(str(model_path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # torch raises RuntimeError/ValueError of many kinds for bad files
        raise BundleError(f"{model_path}: not a loadable TorchScript file ({str(e).splitlines()[0]})") from None
    try:
        embedded = Card.from_dict(json.loads(extra[CARD_FILE]), source=f"{model_path} (embedded card)")
    except (json.JSONDecodeError, BundleError) as e:
        raise BundleError(f"{model_path}: embedded card unreadable ({e})") from None
    if embedded != card:
        diff = [k for k in card.to_dict() if card.to_dict()[k] != embedded.to_dict()[k]]
        raise BundleError(f"{path}: card.json differs from the card embedded in {MODEL_FILE} in {diff}")
    module.eval()
    return Bundle(module=module, card=card, path=path)
