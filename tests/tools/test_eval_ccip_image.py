"""How kxl turns an image into CCIP's input: dghs-imgutils' rules (docs/eval-ccip.md), each
checked against a value computed here by other means (palette lookups, the blend formula,
Python-float arithmetic). tests/tools/test_eval_ccip_imgutils.py compares with imgutils itself."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from PIL import Image

from kxl_tools.eval.ccip_image import CLIP_MEAN, CLIP_STD, SIZE, ccip_input, to_rgb, to_tensor
from kxl_tools.eval.errors import EvalError

pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency")


def reopened(image, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    buf.seek(0)
    return Image.open(buf)


def palette_image(rng, h=13, w=17, colours=8):
    idx = rng.integers(0, colours, (h, w)).astype(np.uint8)
    palette = rng.integers(0, 256, (colours, 3)).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.ravel().tolist())
    return im, idx, palette


def blend_over_white(value, opacity):
    """value laid over white with opacity/255, in real numbers."""
    value, opacity = np.asarray(value, np.float64), np.asarray(opacity, np.float64)
    return value * opacity / 255 + 255 * (1 - opacity / 255)


@pytest.mark.parametrize("transparency", [3, bytes([0, 40, 80, 120, 160, 200, 240, 255])])
def test_palette_transparency_is_ignored(transparency):
    """PIL refuses a P image as a paste mask, so imgutils keeps the palette colours."""
    im, idx, palette = palette_image(np.random.default_rng(1))
    back = reopened(im, transparency=transparency)
    assert "transparency" in back.info
    assert np.array_equal(np.asarray(to_rgb(back)), palette[idx])


def test_pa_alpha_is_ignored():
    im, idx, palette = palette_image(np.random.default_rng(2))
    pa = im.convert("PA")
    pa.putalpha(Image.fromarray(np.full(idx.shape, 7, np.uint8)))
    assert pa.mode == "PA"
    assert np.array_equal(np.asarray(to_rgb(pa)), palette[idx])


@hsettings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["RGBA", "LA"]))
def test_alpha_images_are_laid_over_white(seed, mode):
    rgba = np.random.default_rng(seed).integers(0, 256, (9, 11, 4)).astype(np.uint8)
    im = Image.fromarray(rgba, "RGBA").convert(mode)
    colour = np.asarray(im.convert("RGB"), np.float64)
    alpha = np.asarray(im.getchannel("A"), np.float64)[..., None]
    got = np.asarray(to_rgb(im), np.float64)
    assert np.abs(got - blend_over_white(colour, alpha)).max() <= 1  # PIL blends in integers


def test_gray_with_a_key_is_laid_over_white_through_its_own_levels():
    """An L image with a tRNS key is its own (L) mask: each level v is v over white at opacity
    v/255, and the key's pixels are not made transparent."""
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    back = reopened(Image.fromarray(gray, "L"), transparency=200)
    assert back.info["transparency"] == 200
    got = np.asarray(to_rgb(back), np.float64)
    assert np.abs(got - blend_over_white(gray, gray)[..., None]).max() <= 1
    assert np.abs(got[gray == 200] - blend_over_white(200, 200)).max() <= 1


def test_rgb_with_a_key_is_unchanged():
    rgb = np.random.default_rng(3).integers(0, 256, (7, 5, 3)).astype(np.uint8)
    back = reopened(Image.fromarray(rgb, "RGB"), transparency=tuple(int(c) for c in rgb[0, 0]))
    assert "transparency" in back.info
    assert np.array_equal(np.asarray(to_rgb(back)), rgb)


@pytest.mark.parametrize("mode,values,fmt", [
    ("I;16", np.array([[0, 1, 254, 255], [256, 1000, 40000, 65535]], np.uint16), "PNG"),
    ("I", np.array([[-70000, -1, 0, 1], [128, 255, 256, 10**6]], np.int32), "TIFF"),
])
def test_wide_integer_modes_clip_to_8_bits(mode, values, fmt):
    back = reopened(Image.fromarray(values).convert(mode), fmt)
    assert back.mode == mode
    want = np.clip(values.astype(np.int64), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(back)), np.repeat(want[..., None], 3, axis=-1))


def test_exif_orientation_is_not_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": a viewer shows it 5 wide, 9 high
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (9, 5), (200, 30, 30)).save(path, exif=exif.tobytes())
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == 6
        assert to_rgb(im).size == (9, 5)


def test_normalization_runs_in_float64_then_float32():
    """Every level of every channel: (v/255 in float32, as a Python float, minus the mean, over
    the std, in Python floats) rounded to float32, which differs from float32 arithmetic."""
    levels = np.arange(SIZE * SIZE) % 256
    rgb = np.stack([levels, (levels + 85) % 256, (levels + 170) % 256], axis=-1).astype(np.uint8)
    tensor = to_tensor(Image.fromarray(rgb.reshape(SIZE, SIZE, 3), "RGB"))  # 384x384: resize keeps it
    assert tensor.dtype == np.float32 and tensor.shape == (3, SIZE, SIZE)
    float32_path_differs = 0
    for c in range(3):
        mean, std = float(CLIP_MEAN[c]), float(CLIP_STD[c])
        table = np.array([np.float32((float(np.float32(v) / np.float32(255)) - mean) / std) for v in range(256)])
        assert np.array_equal(tensor[c].ravel(), table[rgb[..., c].ravel()])
        f32 = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
        float32_path_differs += int((f32 != table).sum())
    assert float32_path_differs > 0


def test_an_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(EvalError, match="broken.png: cannot read it as an image for CCIP"):
        ccip_input(bad)
