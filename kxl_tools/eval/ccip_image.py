"""An image as deepghs' CCIP sees it: the input tensor dghs-imgutils 0.19.0 builds, bit for bit.

The card's CCIP figures come from dghs-imgutils (`imgutils.metrics.ccip`), so kxl reproduces
its image handling on purpose, quirks included (docs/eval-ccip.md lists them; the test
tests/tools/test_eval_ccip_imgutils.py runs imgutils itself and expects equal bits):

- Transparency: an image flagged as transparent (mode RGBA, LA or PA, or a "transparency"
  key in its info: a PNG tRNS chunk, a GIF transparent index) is pasted over a white RGBA
  canvas through itself as the mask. PIL takes only 1, L, LA, RGBA and RGBa images as masks;
  for the others (P, PA, RGB, I;16... with a transparency key) the paste is refused and the
  image is used as it is, its transparency ignored. So a palette image's transparent pixels
  keep their palette colour, and a grayscale (or 1-bit) image with a tRNS key is laid over
  white with its own gray levels as the opacity.
- Then PIL's convert("RGB"), whatever the mode (I, I;16 and F clip to 0..255, CMYK and
  YCbCr use PIL's formulas). No EXIF orientation is applied; only the first frame is read.
- 384x384 with PIL's bilinear resize (aspect ratio not kept), divided by 255 in float32,
  then normalized with CLIP's mean/std in float64 (imgutils' mean/std are float64 arrays,
  so numpy promotes) and cast back to float32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import EvalError

SIZE = 384
# float64 on purpose: imgutils normalizes with float64 arrays (see the module docstring)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float64)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float64)

FLAGGED_ALPHA_MODES = ("RGBA", "LA", "PA")
# the modes PIL's Image.paste accepts as a mask (others raise "bad transparency mask")
PASTE_MASK_MODES = ("1", "L", "LA", "RGBA", "RGBa")


def flagged_transparent(image) -> bool:
    """imgutils' test for "has an alpha channel". (It also asks a palette for a transparent
    colour; that can only answer yes for P/PA images, whose paste is refused anyway.)"""
    return image.mode in FLAGGED_ALPHA_MODES or "transparency" in image.info


def to_rgb(image):
    """The RGB image imgutils' load_image(image, mode="RGB") returns (white background)."""
    from PIL import Image

    if flagged_transparent(image) and image.mode in PASTE_MASK_MODES:
        # the image is its own mask: its alpha band for LA/RGBA, its pixel values for 1/L
        canvas = Image.new("RGBA", image.size, "white")
        canvas.paste(image, (0, 0), mask=image)
        image = canvas
    return image if image.mode == "RGB" else image.convert("RGB")


def to_tensor(rgb, size: int = SIZE) -> np.ndarray:
    """[3, size, size] float32: bilinear resize, /255 in float32, CLIP-normalized in float64."""
    from PIL import Image

    pixels = np.asarray(rgb.resize((size, size), resample=Image.BILINEAR), dtype=np.float32)
    scaled = pixels.transpose(2, 0, 1) / np.float32(255)
    normalized = (scaled.astype(np.float64) - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]
    return normalized.astype(np.float32)


def ccip_input(source, size: int = SIZE) -> np.ndarray:
    """A path or a PIL image -> the model's input for it ([3, size, size] float32)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return to_tensor(to_rgb(source), size)
    try:
        with Image.open(source) as image:
            return to_tensor(to_rgb(image), size)
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise EvalError(f"{Path(source)}: cannot read it as an image for CCIP ({exc})") from exc
