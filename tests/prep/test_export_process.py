"""kxl_prep.export.process: bad input never crashes, conversions match what sd-scripts sees,
down-sizing keeps every image in the bucket it had."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from kxl_prep.buckets import DEFAULT_GRID, BucketAssigner
from kxl_prep.export.process import (
    ExportSettings,
    Processed,
    Rejected,
    centre_crop_box,
    cover_size,
    process_image,
    target_size,
)
from kxl_testing.export_inputs import encode, photo_like

BUCKET_OF = BucketAssigner(DEFAULT_GRID).assign_one
COPY = ExportSettings()
WEBP = ExportSettings(format="webp", quality=90)


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_copy_keeps_the_original_bytes():
    data = encode(photo_like(120, 80, 1), "jpg")
    out = process_image(data, "jpg", COPY, None)
    assert isinstance(out, Processed)
    assert out.data == data and out.ext == "jpg" and out.size == (120, 80) and out.notes == []


def test_wrong_extension_is_fixed_not_rejected():
    data = png_bytes(photo_like(40, 30, 2))
    out = process_image(data, "jpg", COPY, None)
    assert isinstance(out, Processed)
    assert out.ext == "png" and out.data == data
    assert "ext_fixed:jpg->png" in out.notes
    # Danbooru's "jpeg" spelling of a JPEG is not a mismatch
    jpeg = encode(photo_like(40, 30, 2), "jpg")
    assert process_image(jpeg, "jpeg", COPY, None).notes == []


@pytest.mark.parametrize("payload", [b"", b"\x00" * 100, b"PK\x03\x04 a zip file", b"\x00\x00\x00\x18ftypmp42...."])
def test_non_images_are_rejected(payload):
    out = process_image(payload, "jpg", COPY, None)
    assert isinstance(out, Rejected) and out.reason == "not_an_image"


def test_truncated_jpeg_is_rejected_when_verifying():
    data = encode(photo_like(300, 200, 3), "jpg")
    cut = data[: len(data) // 2]
    out = process_image(cut, "jpg", COPY, None)
    assert isinstance(out, Rejected) and out.reason == "truncated"
    assert isinstance(process_image(cut, "jpg", WEBP, None), Rejected)
    # header-only verification trusts it (documented trade-off)
    assert isinstance(process_image(cut, "jpg", ExportSettings(verify="header"), None), Processed)


def test_corrupt_png_is_rejected():
    data = bytearray(png_bytes(photo_like(64, 64, 4)))
    idat = data.index(b"IDAT")
    for i in range(idat + 20, idat + 60):
        data[i] ^= 0xFF
    out = process_image(bytes(data), "png", COPY, None)
    assert isinstance(out, Rejected) and out.reason in ("corrupt", "truncated")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_rejected_before_decoding():
    # 100k x 100k declared: Pillow itself refuses it (> 2x the limit)
    out = process_image(_png_header_only(100_000, 100_000), "png", COPY, None)
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb"
    # between the limit and twice it: our own check
    out = process_image(_png_header_only(20_000, 10_000), "png", COPY, None)
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb"
    small_limit = ExportSettings(max_pixels=100 * 100)
    out = process_image(encode(photo_like(101, 100, 5), "jpg"), "jpg", small_limit, None)
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb"
    assert isinstance(process_image(encode(photo_like(100, 100, 5), "jpg"), "jpg", small_limit, None), Processed)


def test_cmyk_is_converted_to_the_rgb_sd_scripts_would_see():
    src = photo_like(64, 48, 6).convert("CMYK")
    data = encode(src, "jpg")
    out = process_image(data, "jpg", COPY, None)
    assert isinstance(out, Processed)
    assert out.ext == "png" and "cmyk" in out.notes and "converted_to_png" in out.notes
    expected = np.asarray(decode(data).convert("RGB"))  # sd-scripts: Image.open(...).convert("RGB")
    assert np.array_equal(np.asarray(decode(out.data)), expected)


def test_palette_is_copied_as_is_and_converted_on_reencode():
    src = photo_like(50, 40, 7).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    data = png_bytes(src)
    copied = process_image(data, "png", COPY, None)
    assert isinstance(copied, Processed) and copied.data == data
    as_png = process_image(data, "png", ExportSettings(format="png"), None)
    assert "palette" in as_png.notes
    assert np.array_equal(np.asarray(decode(as_png.data)), np.asarray(src.convert("RGB")))


def test_16bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    data = png_bytes(Image.fromarray(values))
    assert decode(data).mode.startswith("I")
    out = process_image(data, "png", COPY, None)
    assert isinstance(out, Processed) and "16bit" in out.notes
    got = np.asarray(decode(out.data))
    assert got.shape == (2, 4, 3)
    for channel in range(3):
        assert np.array_equal(got[..., channel], (values >> 8).astype(np.uint8))


def test_alpha_drop_matches_sd_scripts_and_white_composites():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under fully transparent pixels
    rgba[:4, :, 3] = 255  # top half opaque
    data = png_bytes(Image.fromarray(rgba, "RGBA"))
    drop = process_image(data, "png", ExportSettings(format="png"), None)
    assert np.array_equal(np.asarray(decode(drop.data)), np.asarray(decode(data).convert("RGB")))
    white = np.asarray(decode(process_image(data, "png", ExportSettings(format="png", alpha="white"), None).data))
    assert (white[:4, :, 0] == 200).all() and (white[:4, :, 1:] == 0).all()
    assert (white[4:] == 255).all()


def test_animated_images_are_rejected():
    frames = [photo_like(20, 20, i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    out = process_image(buf.getvalue(), "png", COPY, None)
    assert isinstance(out, Rejected) and out.reason == "animated"


def test_gif_is_an_unsupported_format():
    out = process_image(encode(photo_like(20, 20, 1).convert("P"), "gif"), "gif", COPY, None)
    assert isinstance(out, Rejected) and out.reason == "unsupported_format"


@pytest.mark.parametrize("fmt,ext", [("webp", "webp"), ("jpeg", "jpg"), ("png", "png")])
def test_reencode_cover_writes_the_sd_scripts_resized_size(fmt, ext):
    src = photo_like(1600, 1000, 8)
    data = encode(src, "jpg", quality=95)
    out = process_image(data, "jpg", ExportSettings(format=fmt, resize="cover"), BUCKET_OF)
    assert isinstance(out, Processed) and out.ext == ext
    bucket = BUCKET_OF(1600, 1000)
    assert bucket == (1280, 768)
    # by hand: aspect 1.6 is narrower than the bucket's 1.667, so widths match: scale 0.8
    assert out.size == (1280, 800)
    assert decode(out.data).size == (1280, 800)
    # the content is the source, down-sized: compare with OpenCV's area resize
    import cv2

    ref = cv2.resize(np.asarray(src), (1280, 800), interpolation=cv2.INTER_AREA).astype(np.float64)
    got = np.asarray(decode(out.data).convert("RGB"), dtype=np.float64)
    assert np.abs(got - ref).mean() < 12  # codec loss only


def test_reencode_crop_writes_the_bucket_with_sd_scripts_centre_crop():
    src = photo_like(1000, 1600, 9)
    data = png_bytes(src)
    out = process_image(data, "png", ExportSettings(format="png", resize="crop", resample="box"), BUCKET_OF)
    bucket = BUCKET_OF(1000, 1600)
    assert out.size == bucket == (768, 1280)
    # by hand: aspect 0.625 is wider than the bucket's 0.6, so heights match: scale 0.8,
    # (800, 1280), then trim 32 columns: 16 from the left
    cover = cover_size(1000, 1600, bucket)
    assert cover == (800, 1280)
    assert centre_crop_box(cover, bucket) == (16, 0, 784, 1280)
    ref = src.resize(cover, Image.Resampling.BOX).crop((16, 0, 784, 1280))
    assert np.array_equal(np.asarray(decode(out.data)), np.asarray(ref))


def test_crop_box_is_sd_scripts_trim_half():
    assert centre_crop_box((1300, 768), (1280, 768)) == (10, 0, 1290, 768)
    assert centre_crop_box((1281, 768), (1280, 768)) == (0, 0, 1280, 768)  # trim 1 -> 1 // 2 = 0
    assert centre_crop_box((768, 1283), (768, 1280)) == (0, 1, 768, 1281)


def test_small_images_are_never_up_sized():
    data = encode(photo_like(300, 200, 10), "jpg")
    for mode in ("cover", "crop"):
        out = process_image(data, "jpg", ExportSettings(format="webp", resize=mode), BUCKET_OF)
        assert out.size == (300, 200) and "resized" not in out.notes


def test_jpeg_draft_gives_the_same_size_as_a_full_decode():
    data = encode(photo_like(3000, 2000, 11), "jpg")
    fast = process_image(data, "jpg", ExportSettings(format="jpeg", resize="cover", jpeg_draft=True), BUCKET_OF)
    full = process_image(data, "jpg", ExportSettings(format="jpeg", resize="cover", jpeg_draft=False), BUCKET_OF)
    assert fast.size == full.size == cover_size(3000, 2000, BUCKET_OF(3000, 2000))
    a = np.asarray(decode(fast.data), dtype=np.float64)
    b = np.asarray(decode(full.data), dtype=np.float64)
    assert np.abs(a - b).mean() < 8


def test_settings_are_validated():
    with pytest.raises(ValueError, match="resize needs a re-encoding format"):
        ExportSettings(format="copy", resize="cover")
    with pytest.raises(ValueError, match="quality"):
        ExportSettings(format="webp", quality=0)
    with pytest.raises(ValueError, match="format"):
        ExportSettings(format="gif")


sizes = st.integers(min_value=16, max_value=12000)


@settings(max_examples=400, deadline=None)
@given(sizes, sizes, st.sampled_from(["cover", "crop"]))
def test_written_size_stays_in_the_source_bucket(width, height, mode):
    """What sd-scripts computes from meta.json's image_size (the written size) is the
    bucket the source had, and it has nothing left to resize (only to crop)."""
    source_bucket = BUCKET_OF(width, height)
    size, crop = target_size((width, height), BUCKET_OF, mode)
    written = crop if crop is not None else size
    assert BUCKET_OF(*written) == source_bucket
    if written != (width, height):  # down-sized: it covers the bucket exactly on one side
        bw, bh = source_bucket
        assert written[0] >= bw and written[1] >= bh
        assert written[0] == bw or written[1] == bh
        assert cover_size(*written, source_bucket) == written
        assert written[0] <= width and written[1] <= height


_SEEDS = {
    "jpg": encode(photo_like(48, 32, 21), "jpg"),
    "png": png_bytes(photo_like(40, 30, 22).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
    "webp": encode(photo_like(40, 40, 23), "webp"),
}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(_SEEDS)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.sampled_from([COPY, WEBP, ExportSettings(format="jpeg", resize="cover")]),
)
def test_damaged_files_never_raise(kind, flips, cut, settings_):
    """Random byte damage and truncation: a Processed whose bytes decode, or a Rejected."""
    data = bytearray(_SEEDS[kind])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    out = process_image(bytes(data), kind, settings_, BUCKET_OF)
    assert isinstance(out, (Processed, Rejected))
    if isinstance(out, Processed):
        assert decode(out.data).size == out.size
    else:
        assert out.reason in {"not_an_image", "corrupt", "truncated", "unsupported_format", "animated",
                              "decompression_bomb", "too_large"}
