"""Loading images of every mode users send into RGB uint8, as the original's ``Image.open(f).convert('RGB')``.

Beyond the original: EXIF orientation is applied (a phone photo comes out upright, as viewers show it), and
16-bit / 32-bit greyscale is scaled to 8 bits instead of being clipped at 255.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def to_rgb(image: Image.Image, *, in_place: bool = False) -> Image.Image:
    """Any PIL image -> RGB (EXIF orientation applied; alpha dropped as the original does; CMYK/P/L converted),
    never the caller's object unless ``in_place`` (an image the caller will not use again, such as a file just
    decoded: the EXIF rotation then happens in it and an RGB image comes back as it is, with no copy)."""
    if in_place:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)  # a copy, rotated or not
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(a * 255.0 / scale), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image again


def load_image(source) -> Image.Image:
    """A path (str / PathLike) or a PIL image -> RGB PIL image. Unreadable files raise ``OSError`` naming the path."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = os.fspath(source)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, in_place=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:  # not an OSError: it would reach the user as a traceback
        raise OSError(f"cannot read image {path}: {e} (the limit is twice PIL.Image.MAX_IMAGE_PIXELS, now "
                      f"{Image.MAX_IMAGE_PIXELS}; for a file you trust, raise that setting, or set it to None)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read image {path}: {e}") from None
