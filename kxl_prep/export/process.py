"""Decode, check, convert, resize and encode one image (pure: bytes in, bytes or a reject out).

What sd-scripts does with an image we write decides the rules here:
- it opens it with Pillow and calls `.convert("RGB")` (alpha dropped, no EXIF rotation, no
  ICC transform), so the default conversions reproduce exactly that;
- it picks the bucket from meta.json's `image_size`, scales the image so it covers the
  bucket (`scale = bh/h` when the image is wider than the bucket, else `bw/w`; size
  `int(w*scale+.5), int(h*scale+.5)`), then centre-crops `trim // 2`
  (train_util.BucketManager.select_bucket, trim_and_resize_if_required).
Down-sizing here to that covering size ("cover") leaves sd-scripts nothing to resize, only
the same crop; "crop" also applies the crop, writing exactly the bucket's size. Images are
never up-sized. Every written size is checked to fall in the same bucket as the source.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

Bucket = tuple[int, int]
BucketFn = Callable[[int, int], Bucket]

FORMATS = ("copy", "webp", "jpeg", "png")
RESIZE_MODES = ("none", "cover", "crop")
ALPHA_MODES = ("drop", "white")
VERIFY_MODES = ("full", "header")
FORMAT_EXT = {"webp": "webp", "jpeg": "jpg", "png": "png"}
# Pillow format name -> the extension we write for it
PIL_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "AVIF": "avif"}
# Danbooru spellings of the same format
EXT_ALIASES = {"jpeg": "jpg", "jpe": "jpg"}
# Modes sd-scripts' `.convert("RGB")` handles faithfully: kept as-is when copying.
COPY_SAFE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1"}
# area: cv2 INTER_AREA, what sd-scripts itself uses to down-size (bit-identical result);
# box / lanczos: Pillow's filters (no OpenCV needed)
RESAMPLE = {"area": None, "box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class ExportSettings:
    format: str = "copy"  # copy: original bytes; else re-encode to this format
    quality: int = 90  # webp / jpeg quality
    resize: str = "none"  # none | cover | crop (see module doc)
    resample: str = "area"  # area: sd-scripts' own down-sizing (cv2 INTER_AREA)
    alpha: str = "drop"  # drop: what sd-scripts' convert("RGB") sees; white: composite on white
    verify: str = "full"  # full: decode every copied image; header: only parse its header
    max_pixels: int = 178_956_970  # larger images are rejected as decompression bombs
    webp_method: int = 4  # libwebp effort 0 (fast) .. 6 (small)
    jpeg_draft: bool = True  # let libjpeg decode at 1/2, 1/4, 1/8 scale when down-sizing

    def __post_init__(self) -> None:
        checks = [("format", FORMATS), ("resize", RESIZE_MODES), ("alpha", ALPHA_MODES),
                  ("verify", VERIFY_MODES), ("resample", tuple(RESAMPLE))]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"export setting {name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.format == "copy" and self.resize != "none":
            raise ValueError("export setting resize needs a re-encoding format (webp, jpeg or png), not copy")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"export setting quality={self.quality}: expected 1..100")
        if not 0 <= self.webp_method <= 6:
            raise ValueError(f"export setting webp_method={self.webp_method}: expected 0..6")
        if self.max_pixels < 1:
            raise ValueError("export setting max_pixels must be positive")
        if self.resize != "none" and self.resample == "area":
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise ValueError("export setting resample=area needs OpenCV (pip install opencv-python-headless, "
                                 "part of kxl[train]); or use resample=box") from None

    def fingerprint(self) -> dict:
        """What decides the written files (a change makes earlier outputs inconsistent)."""
        return asdict(self)


@dataclass
class Processed:
    data: bytes
    ext: str
    size: tuple[int, int]  # written (w, h)
    source_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)  # conversions applied, for the summary


@dataclass
class Rejected:
    reason: str  # short machine-readable category
    detail: str = ""


def normalize_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    return EXT_ALIASES.get(ext, ext)


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """sd-scripts' resized size: scale (w, h) so it covers `bucket`, rounding half up."""
    bw, bh = bucket
    if width / height > bw / bh:  # wider than the bucket: match heights
        scale = bh / height
    else:
        scale = bw / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def centre_crop_box(size: tuple[int, int], bucket: Bucket) -> tuple[int, int, int, int]:
    """sd-scripts' non-random crop of a covering image to the bucket: trim // 2 each way."""
    w, h = size
    bw, bh = bucket
    left = (w - bw) // 2 if w > bw else 0
    top = (h - bh) // 2 if h > bh else 0
    return left, top, left + min(w, bw), top + min(h, bh)


def target_size(source: tuple[int, int], bucket_of: BucketFn, mode: str) -> tuple[tuple[int, int], Bucket | None]:
    """(covering size, crop bucket or None) for `mode`; the source size when it would grow."""
    if mode == "none":
        return source, None
    bucket = bucket_of(*source)
    cover = cover_size(source[0], source[1], bucket)
    if cover[0] >= source[0] or cover[1] >= source[1]:
        return source, None  # sd-scripts would up-size: leave it to the trainer
    if mode == "crop":
        return cover, bucket
    if bucket_of(*cover) != bucket:
        # the rounded covering size sits on the edge between two buckets: write the bucket
        # itself, which sd-scripts always maps to itself
        return cover, bucket
    return cover, None


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit L by scaling (Pillow's convert clips)."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        out = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255)
    else:
        arr = arr.astype(np.int64)
        if im.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            out = np.clip(arr, 0, 65535) >> 8
        else:
            out = np.clip(arr, 0, 255)
    return Image.fromarray(out.astype(np.uint8), "L")


def to_rgb(im: Image.Image, alpha: str, notes: list[str]) -> Image.Image:
    """The RGB image sd-scripts would see (alpha='drop'), or composited on white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        notes.append("16bit")
        im = _to_8bit_gray(im)
        mode = "L"
    elif mode == "CMYK":
        notes.append("cmyk")
    elif mode in ("P", "PA"):
        notes.append("palette")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        notes.append("alpha_" + alpha)
        if alpha == "white":
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def resize(im: Image.Image, size: tuple[int, int], resample: str) -> Image.Image:
    if resample == "area":
        import cv2

        return Image.fromarray(cv2.resize(np.asarray(im), size, interpolation=cv2.INTER_AREA), im.mode)
    return im.resize(size, RESAMPLE[resample])


def _encode(im: Image.Image, fmt: str, quality: int, webp_method: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        im.save(buf, "WEBP", quality=quality, method=webp_method)
    elif fmt == "jpeg":
        im.save(buf, "JPEG", quality=quality)
    else:
        im.save(buf, "PNG", compress_level=3)
    return buf.getvalue()


def process_image(data: bytes, declared_ext: str, settings: ExportSettings, bucket_of: BucketFn | None) -> Processed | Rejected:
    """Never raises on bad input: returns Rejected with a reason instead."""
    notes: list[str] = []
    Image.MAX_IMAGE_PIXELS = settings.max_pixels  # Pillow itself refuses twice this
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return Rejected("not_an_image", f"{len(data)} bytes, declared .{declared_ext}")
        except Image.DecompressionBombError as exc:
            return Rejected("decompression_bomb", str(exc))
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
            return Rejected("corrupt", f"{type(exc).__name__}: {exc}")
        try:
            return _process_open(im, data, declared_ext, settings, bucket_of, notes)
        except Image.DecompressionBombError as exc:
            return Rejected("decompression_bomb", str(exc))
        except MemoryError:
            return Rejected("too_large", "out of memory while decoding")
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces here
            reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
            return Rejected(reason, f"{type(exc).__name__}: {exc}")
        finally:
            im.close()


def _process_open(im, data, declared_ext, settings, bucket_of, notes) -> Processed | Rejected:
    real_ext = PIL_FORMAT_EXT.get(im.format or "")
    if real_ext is None:
        return Rejected("unsupported_format", f"{im.format} (declared .{declared_ext})")
    if im.format != "MPO" and getattr(im, "is_animated", False):  # MPO: camera JPEG + preview
        return Rejected("animated", f"{im.format} with {getattr(im, 'n_frames', '?')} frames")
    width, height = im.size
    if width < 1 or height < 1:
        return Rejected("corrupt", f"size {width}x{height}")
    if width * height > settings.max_pixels:
        return Rejected("decompression_bomb", f"{width}x{height} > {settings.max_pixels} pixels")
    if normalize_ext(declared_ext) != real_ext:
        notes.append(f"ext_fixed:{normalize_ext(declared_ext)}->{real_ext}")

    if settings.format == "copy" and im.mode in COPY_SAFE_MODES:
        if settings.verify == "full":
            if settings.jpeg_draft and im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L"):
                # 1/8-scale IDCT: the whole entropy-coded stream is still decoded, so
                # truncation and corrupt data are still caught, ~30% cheaper
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
        return Processed(data, real_ext, (width, height), (width, height), notes)

    # Re-encode (asked for, or the mode needs converting: CMYK, 16-bit ...)
    fmt = settings.format if settings.format != "copy" else "png"
    if settings.format == "copy":
        notes.append("converted_to_png")
    size, crop_bucket = (width, height), None
    if settings.resize != "none":
        if bucket_of is None:
            raise ValueError("resize needs a bucket function")
        size, crop_bucket = target_size((width, height), bucket_of, settings.resize)
    if settings.jpeg_draft and size != (width, height) and im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L"):
        im.draft(im.mode, size)  # DCT-domain down-scaling: never below `size`
    im.load()
    rgb = to_rgb(im, settings.alpha, notes)
    if size != rgb.size:
        rgb = resize(rgb, size, settings.resample)
        notes.append("resized")
    if crop_bucket is not None:
        rgb = rgb.crop(centre_crop_box(size, crop_bucket))
        notes.append("cropped")
    out = _encode(rgb, fmt, settings.quality, settings.webp_method)
    return Processed(out, FORMAT_EXT[fmt], rgb.size, (width, height), notes)
