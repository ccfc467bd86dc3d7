"""How the shipped clips were cut (run from the repo root with the corpus beside it).

One 10 s clip per composer from the middle of a piece in the classifier's *test* split, and a
20 s demo clip. Source: ../shared/corpus/symbtr8 (SymbTr renderings, CC BY-NC-SA 4.0).
"""

import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

CORPUS = Path("../shared/corpus/symbtr8")
OUT = Path(__file__).resolve().parent
SR = 22050


def cut(src: Path, dst: Path, seconds: float) -> None:
    y, sr = sf.read(src, dtype="float32")
    assert sr == SR
    n = int(seconds * sr)
    a = max(0, (y.size - n) // 2)
    seg = y[a:a + n].copy()
    fade = int(0.02 * sr)
    seg[:fade] *= np.linspace(0, 1, fade, dtype=np.float32)
    seg[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    sf.write(dst, seg, sr, format="OGG", subtype="VORBIS")


def main(split_json: str) -> None:
    test = json.loads(Path(split_json).read_text())["test"]
    rows = [line.split(",") for line in (CORPUS / "manifest.csv").read_text().splitlines()[1:]]
    by_piece = {r[2]: r for r in rows}
    chosen = {}
    for piece in sorted(test):
        comp = by_piece[piece][1]
        chosen.setdefault(comp, piece)
    for comp, piece in sorted(chosen.items()):
        cut(CORPUS / by_piece[piece][0], OUT / f"{comp}.ogg", 10.0)
        print(comp, piece)
    demo = "huseyni--sarki--devrihindi--gormek_ister--tanburi_cemil_bey"
    cut(CORPUS / by_piece[demo][0], OUT / "demo.ogg", 20.0)


if __name__ == "__main__":
    main(sys.argv[1])
