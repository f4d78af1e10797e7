"""The columnar dataset (kxl_train.dataset) against sd-scripts v0.10.1's own FineTuningDataset
on the same kxl-prep output (skipped without sd-scripts): same buckets, same random draws, and
bitwise the same batches (keys, captions after shuffle and tag dropout, flips, crops, image
tensors, token ids), with sd-scripts' own data order and with kxl's exact resume."""
from __future__ import annotations

import random
import sys

import pytest
import torch

from kxl_testing.accelerator import FakeAccelerator
from kxl_testing.prep_output import make_prep_output
from kxl_train.resume.sampler import EpochItem

BATCH_FIELDS = ("images", "captions", "flippeds", "original_sizes_hw", "crop_top_lefts", "target_sizes_hw",
                "input_ids_list", "loss_weights", "network_multipliers", "kxl_keys", "kxl_item")


@pytest.fixture()
def sd(sd_scripts, tmp_path_factory):
    if str(sd_scripts) not in sys.path:
        sys.path.insert(0, str(sd_scripts))
    from kxl_train import torchvision_compat
    from kxl_common.clip_tokenizer import make_tokenizer_cache

    torchvision_compat.install()
    return make_tokenizer_cache(tmp_path_factory.mktemp("tok"))


def build(tokenizers, toml, columnar: bool, exact: bool):
    """sd-scripts' own dataset set-up (as NetworkTrainer.train runs it) with kxl's patches."""
    import sdxl_train_network
    from library import config_util, strategy_base, strategy_sd, strategy_sdxl, train_util
    from library.config_util import BlueprintGenerator, ConfigSanitizer

    from kxl_train.dataset import sdscripts as columnar_patch
    from kxl_train.resume import sdscripts as resume_patch

    installed = [columnar_patch.install({} if columnar else {"no_columnar_data": True}, [])]
    runtime = resume_patch.install({} if exact else {"inexact_resume": True}, [])
    installed.append(runtime)
    try:
        args = sdxl_train_network.setup_parser().parse_args(
            ["--dataset_config", str(toml), "--tokenizer_cache_dir", str(tokenizers), "--seed", "42",
             "--max_train_steps", "6", "--gradient_accumulation_steps", "2"])
        train_util.prepare_dataset_args(args, True)
        strategy_base.TokenizeStrategy._strategy = None
        strategy_base.TokenizeStrategy.set_strategy(strategy_sdxl.SdxlTokenizeStrategy(None, str(tokenizers)))
        strategy_base.LatentsCachingStrategy._strategy = None  # as sdxl_train_network sets it
        strategy_base.LatentsCachingStrategy.set_strategy(strategy_sd.SdSdxlLatentsCachingStrategy(False, False, 1, False))
        blueprint = BlueprintGenerator(ConfigSanitizer(True, True, False, True)).generate(
            config_util.load_user_config(str(toml)), args)
        random.seed(1234)  # generate_dataset_group_by_blueprint draws the dataset seed from `random`
        group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
        state_after_build = random.getstate()
        group.set_current_strategies()
        if exact:
            runtime.group, runtime.args = group, None
            runtime.set_up(args, FakeAccelerator())
        return group, runtime, installed, state_after_build
    except BaseException:
        uninstall(installed)
        raise


def uninstall(installed):
    for patch in reversed(installed):
        if patch is not None:
            patch.uninstall()


def same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for field in BATCH_FIELDS:
        if field not in a:
            continue
        x, y = a[field], b[field]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), field
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True)), field
        else:
            assert x == y, field


def test_upstream_data_order_gives_identical_batches(sd, tmp_path):
    toml = make_prep_output(tmp_path / "data", n_images=12)
    plain, _, patches, plain_state = build(sd, toml, columnar=False, exact=False)
    uninstall(patches)
    col, _, patches, col_state = build(sd, toml, columnar=True, exact=False)
    try:
        [pds], [cds] = plain.datasets, col.datasets
        assert type(pds).__name__ == "FineTuningDataset" and type(cds).__name__ == "ColumnarFineTuningDataset"
        assert plain_state == col_state  # the same draws from the global random while building
        assert len(plain) == len(col) and pds.bucket_info == cds.bucket_info
        assert pds.bucket_manager.resos == cds.bucket_manager.resos
        assert [list(b) for b in pds.bucket_manager.buckets] == [list(b) for b in cds.bucket_manager.buckets]
        assert list(pds.buckets_indices) == list(cds.buckets_indices)
        assert pds.num_train_images == cds.num_train_images and pds.tag_frequency == cds.tag_frequency
        assert pds.subsets[0].img_count == cds.subsets[0].img_count == 12
        assert sorted(plain.image_data) == sorted(col.image_data)
        assert list(pds.image_data) == list(cds.image_data)  # registration order
        for key in pds.image_data:
            p, c = pds.image_data[key], cds.image_data[key]
            assert (p.image_key, p.caption, p.absolute_path, p.image_size, p.bucket_reso, p.resized_size,
                    p.num_repeats, p.caption_dropout_rate) == (c.image_key, c.caption, c.absolute_path,
                                                               c.image_size, c.bucket_reso, c.resized_size,
                                                               c.num_repeats, c.caption_dropout_rate)
        for epoch in (1, 2, 3):  # sd-scripts reshuffles buckets and batches on each epoch change
            pds.set_current_epoch(epoch)
            cds.set_current_epoch(epoch)
            assert list(pds.buckets_indices) == list(cds.buckets_indices)
            random.seed(epoch)
            plain_batches = [plain[i] for i in range(len(plain))]
            random.seed(epoch)
            col_batches = [col[i] for i in range(len(col))]
            for a, b in zip(plain_batches, col_batches, strict=True):
                same_batch(a, b)
    finally:
        uninstall(patches)


def test_exact_resume_gives_identical_batches_and_fingerprints(sd, tmp_path):
    toml = make_prep_output(tmp_path / "data", n_images=12)
    plain, plain_rt, patches, _ = build(sd, toml, columnar=False, exact=True)
    try:
        plain_recipe = plain_rt.recipe
        plain_items = {(e, p): plain[EpochItem(e, p, i)] for e in (0, 1, 4) for p, i in enumerate(range(len(plain)))}
    finally:
        uninstall(patches)
    col, col_rt, patches, _ = build(sd, toml, columnar=True, exact=True)
    try:
        assert type(col.datasets[0]).__name__ == "ColumnarFineTuningDataset"
        assert col_rt.recipe == plain_recipe  # a state saved by either run resumes in the other
        for (e, p), expected in reversed(list(plain_items.items())):  # another loading order
            same_batch(expected, col[EpochItem(e, p, p)])
        flips = [f for ex in plain_items.values() for f in ex["flippeds"]]
        assert any(flips) and not all(flips)
        assert len({ex["captions"][0] for ex in plain_items.values()}) > 1
    finally:
        uninstall(patches)


def test_not_a_prep_output_or_turned_off_uses_sd_scripts_dataset(sd, tmp_path):
    from kxl_common.train_records import StaleRecords
    from kxl_prep import outputs as out

    toml = make_prep_output(tmp_path / "data", n_images=6)
    group, _, patches, _ = build(sd, toml, columnar=True, exact=False)
    uninstall(patches)
    assert type(group.datasets[0]).__name__ == "ColumnarFineTuningDataset"
    # another bucket grid than the records were written for: sd-scripts' own dataset
    other = tmp_path / "other.toml"
    other.write_text(toml.read_text().replace("max_bucket_reso = 128", "max_bucket_reso = 160"))
    group, _, patches, _ = build(sd, other, columnar=True, exact=False)
    uninstall(patches)
    assert type(group.datasets[0]).__name__ == "FineTuningDataset"
    # no train_records.arrow: sd-scripts' own dataset
    (tmp_path / "data" / out.TRAIN_RECORDS).rename(tmp_path / "records.bak")
    group, _, patches, _ = build(sd, toml, columnar=True, exact=False)
    uninstall(patches)
    assert type(group.datasets[0]).__name__ == "FineTuningDataset"
    (tmp_path / "records.bak").rename(tmp_path / "data" / out.TRAIN_RECORDS)
    # meta.json rewritten after the records: refused, with what to do
    meta = tmp_path / "data" / out.META_JSON
    meta.write_text(meta.read_text().replace("1girl", "1boy"))
    out.refresh_output_entry(tmp_path / "data", out.META_JSON, "kxl-prep export")
    with pytest.raises(StaleRecords, match="--kxl-no-columnar-data"):
        build(sd, toml, columnar=True, exact=False)
    group, _, patches, _ = build(sd, toml, columnar=False, exact=False)
    uninstall(patches)
    assert type(group.datasets[0]).__name__ == "FineTuningDataset"


def test_patches_uninstall_and_refuse_caching(sd, tmp_path):
    from library import config_util, train_util

    from kxl_train.dataset import sdscripts as columnar_patch

    before = (config_util.FineTuningDataset, train_util.DatasetGroup.__init__)
    group, _, patches, _ = build(sd, make_prep_output(tmp_path / "data", n_images=4), columnar=True, exact=False)
    with pytest.raises(columnar_patch.PatchError, match="caching"):
        group.new_cache_latents(None, None)
    uninstall(patches)
    assert (config_util.FineTuningDataset, train_util.DatasetGroup.__init__) == before
