"""kxl_common.check_env.bnb_refusal: the one bitsandbytes check of the launch and the entry."""
from __future__ import annotations

import pytest

from kxl_common import check_env


@pytest.fixture
def bnb(monkeypatch):
    def installed(version):
        def fake(name):
            if version is None:
                raise check_env.md.PackageNotFoundError(name)
            return version
        monkeypatch.setattr(check_env.md, "version", fake)
    return installed


@pytest.mark.parametrize("optimizer", ["Lion8bit", "AdamW8bit", "PagedLion8bit"])
def test_eight_bit_optimizer_needs_a_good_bitsandbytes(bnb, optimizer):
    bnb(None)
    assert "not installed" in check_env.bnb_refusal(optimizer)
    bnb("0.38.1")
    assert "bitsandbytes issue 659" in check_env.bnb_refusal(optimizer)
    bnb("0.41.1")
    assert check_env.bnb_refusal(optimizer) is None


def test_other_optimizers_and_unknown_optimizer(bnb):
    bnb("0.38.1")
    assert check_env.bnb_refusal("AdamW") is None and check_env.bnb_refusal("") is None
    assert "0.36.0..0.41.0" in check_env.bnb_refusal(None)  # the entry: a broken release is refused
    bnb(None)
    assert check_env.bnb_refusal(None) is None  # missing: sd-scripts reports it if an 8-bit optimizer asks
