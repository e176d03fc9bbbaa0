"""One image file as the loaders read it: any PIL mode turned into RGB, and whether a file can be read at all.

Folders users have hold more than RGB JPEGs: greyscale scans, palette PNGs and GIF-like files, CMYK JPEGs from print
workflows, PNGs with an alpha channel. Each becomes the RGB image a model trained on photos expects: transparency is
composited over white (dropping the alpha channel would show whatever colour the transparent pixels happen to hold,
often black), everything else is PIL's own conversion. A file that cannot be decoded (truncated, not an image) is
found once, when the data is scanned, so a run never fails on it half-way through an epoch.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

BACKGROUND = (255, 255, 255)  # what transparent pixels show


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: alpha (RGBA, LA, PA, a palette with a transparent colour) over white, other modes
    (L, P, CMYK, YCbCr, I;16, …) by PIL's conversion."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode.startswith("I;16"):  # 16-bit greyscale: scale to 8 bits before PIL's (clipping) conversion
        return image.point(lambda v: v / 256).convert("L").convert("RGB")
    return image.convert("RGB")


def read_rgb(path: Path) -> Image.Image:
    """The file at `path` decoded as RGB; OSError (naming the file) when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()  # the pixels, before the file closes
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for truncated or malformed files
        raise OSError(f"cannot read image {path}: {err}") from err


def unreadable(path: Path) -> str | None:
    """Why the image at `path` cannot be decoded, or None when it can. JPEGs decode at 1/8 scale (what detects a
    truncated or corrupt file, at a fraction of a full decode)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    return None
