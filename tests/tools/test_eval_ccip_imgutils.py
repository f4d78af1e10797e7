"""kxl's CCIP gives dghs-imgutils' numbers bit for bit: imgutils 0.19.0 itself runs in its own
environment (kxl_testing.imgutils_env: made once, cached; skipped with the reason where it
cannot be installed), on the stand-in model folder served from a hub cache with
HF_HUB_OFFLINE=1, over files of every PIL mode (kxl_testing.eval_ccip.MODE_IMAGES)."""
from __future__ import annotations

import numpy as np
import onnxruntime
import PIL
import pytest
from PIL import Image

from kxl_testing.eval_ccip import MODE_IMAGES, write_mode_images, write_standin_ccip
from kxl_testing.imgutils_env import ImgutilsUnavailable, imgutils_python, run_imgutils_ccip
from kxl_tools.eval.ccip import CCIP, CPU

pytestmark = [pytest.mark.imgutils, pytest.mark.filterwarnings("ignore:Palette images with Transparency")]

# generated images against references: a batch other than the whole list
CROSS = ([0, 3, 6, 8], [1, 4, 9, 13, 18, 22])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    try:
        python = imgutils_python()
    except ImgutilsUnavailable as exc:
        pytest.skip(f"dghs-imgutils cannot be installed in a separate environment: {exc}")
    root = tmp_path_factory.mktemp("ccip_imgutils")
    folder = write_standin_ccip(root / "ccip_onnx")
    images = write_mode_images(root / "images")
    paths = [p for _, p in images]
    ref = run_imgutils_ccip(python, folder, paths, CROSS, root / "run")
    return {"folder": folder, "images": images, "paths": paths, "ref": ref,
            "ccip": CCIP(folder, providers=[CPU])}


def test_the_images_cover_every_mode(world):
    modes = set()
    for _, path in world["images"]:
        with Image.open(path) as im:
            modes.add((im.mode, "transparency" in im.info))
    want = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"}
    assert want <= {m for m, _ in modes}
    assert {("P", True), ("L", True), ("1", True), ("RGB", True), ("I;16", True)} <= modes
    assert len(MODE_IMAGES) == len(world["paths"])


def test_same_libraries_under_both(world):
    """Otherwise a difference could come from Pillow or onnxruntime, not from the code."""
    versions = world["ref"]["versions"]
    assert versions["dghs-imgutils"] == "0.19.0"
    assert (versions["pillow"], versions["onnxruntime"]) == (PIL.__version__, onnxruntime.__version__)
    assert versions["numpy"].startswith("1.")  # imgutils' own pin; kxl's numpy may be 2


def test_features_equal_imgutils_batch(world):
    ours, ref = world["ccip"].features(world["paths"]), world["ref"]["features"]
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape == (len(world["paths"]), 768)
    for (name, _), a, b in zip(world["images"], ours, ref):
        assert np.array_equal(a, b), f"{name}: max |kxl - imgutils| = {np.abs(a - b).max()}"


def test_features_one_at_a_time_equal_imgutils_single(world):
    ours = world["ccip"].features(world["paths"], batch_size=1)
    assert np.array_equal(ours, world["ref"]["single"])


def test_differences_equal_imgutils(world):
    model, ref = world["ccip"], world["ref"]
    feats = model.features(world["paths"])
    assert np.array_equal(model.differences(feats), ref["differences"])
    rows, cols = CROSS
    cross = model.cross_differences(feats[rows], feats[cols])
    assert cross.dtype == np.float32 and np.array_equal(cross, ref["cross"])
    assert model.threshold == float(ref["threshold"])


def test_the_quirks_are_exercised(world):
    """The images where imgutils departs from plain alpha compositing over white are among
    those compared (else the bitwise test could pass without covering them)."""
    model = world["ccip"]
    by_name = dict(world["images"])
    for name in ("P+t", "P+t-gif", "P+trns", "L+t", "PA"):
        with Image.open(by_name[name]) as im:
            over_white = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        naive = model.features([over_white.convert("RGB")])[0]
        ref = world["ref"]["features"][[n for n, _ in world["images"]].index(name)]
        assert np.abs(naive - ref).max() > 0.1 * np.abs(ref).max(), name
