"""Write a 224-px stand-in for a user's photo folder: CIFAR-10 images upscaled (bicubic) to 256 x 256 JPEGs, as an
ImageFolder tree with train/ and test/ (CIFAR's own class folders). Never committed; written under .cache/bench/.

    .venv/bin/python bench/make_photos.py --train 22223 --test 500     # prints the folder it wrote
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.data import balanced_subset, default_data_root  # noqa: E402
from pipeline.core.data.sources import DataSource, scan  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def make_photos(out: Path, train: int, test: int, side: int = 256, quality: int = 90) -> Path:
    """The tree at `out` (skipped when it is complete): `train` / `test` class-balanced CIFAR-10 images each."""
    source = default_data_root() / "cifar10"
    index = scan(DataSource("imagefolder", source.resolve(), "cifar10", ("train", "test")))
    done = out / f".complete-{train}-{test}-{side}"
    if done.is_file():
        return out
    for split, count in (("train", train), ("test", test)):
        files = index.files[split]
        chosen = files.take(balanced_subset(files.labels, count, seed=0))
        for i in range(len(chosen)):
            target = out / split / index.classes[int(chosen.labels[i])] / f"{i:06d}.jpg"
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(chosen.path(i)) as image:
                image.convert("RGB").resize((side, side), Image.BICUBIC).save(target, quality=quality)
    done.write_text("ok\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=22223, help="training images (class-balanced)")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--side", type=int, default=256, help="side of the written JPEGs (px)")
    parser.add_argument("--out", type=Path, default=None, help="default .cache/bench/cifar10-<side>px-<train>")
    args = parser.parse_args()
    out = args.out or PROJECT_ROOT / ".cache" / "bench" / f"cifar10-{args.side}px-{args.train}"
    print(make_photos(out, args.train, args.test, args.side))


if __name__ == "__main__":
    main()
