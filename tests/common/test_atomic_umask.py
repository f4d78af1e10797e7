"""Files kxl writes get 0666 less the umask, like any Unix tool's (mkstemp alone gives 0600)."""
from __future__ import annotations

import os
import stat

import pytest

from kxl_common.atomic import atomic_open, current_umask, write_bytes, write_json, write_text


@pytest.fixture
def umask():
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o027, 0o077, 0o000])
def test_every_writer_honours_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask and current_umask() == mask  # reading it leaves it as it was
    write_text(tmp_path / "a.txt", "x")
    write_bytes(tmp_path / "b.bin", b"x")
    write_json(tmp_path / "sub" / "c.json", {"x": 1})
    with atomic_open(tmp_path / "d.toml", "w") as fh:
        fh.write("x = 1\n")
    for name in ("a.txt", "b.bin", "sub/c.json", "d.toml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, (name, oct(mask))


def test_a_command_output_is_group_and_world_readable_under_022(tmp_path, umask):
    from click.testing import CliRunner

    from kxl_tools.cli import main
    from kxl_testing.synthetic_checkpoints import lokr_plan, tiny_layout, write_lokr

    umask(0o022)
    write_lokr(tmp_path / "l.safetensors", lokr_plan(tiny_layout(), factor=2))
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "l.safetensors"), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
