"""kxl-train's first-hour refusals: validate (empty recipe, override typo, missing preset, a data
recipe), the sd-scripts commands without sd-scripts, and launch with a model that is not SDXL."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kxl_train.cli import main

REPO = Path(__file__).resolve().parents[2]
REV1 = REPO / "recipes" / "epsilon-rev1.toml"


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def error_line(res) -> str:
    assert res.exit_code != 0 and not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    return res.output.strip().splitlines()[-1]


def test_validate_refuses_an_empty_recipe_and_one_that_trains_nothing(tmp_path):
    (tmp_path / "empty.toml").write_text("# nothing\n")
    assert "is empty" in error_line(run("validate", tmp_path / "empty.toml"))
    (tmp_path / "seed.toml").write_text("seed = 1\n")
    assert "sets no network_module" in error_line(run("validate", tmp_path / "seed.toml"))


def test_an_override_typo_is_blamed_on_the_override():
    line = error_line(run("validate", REV1, "learning_rat=1e-4"))
    assert line.startswith("Error: override learning_rat=1e-4:") and "did you mean 'learning_rate'" in line
    assert str(REV1) not in line


def test_a_missing_preset_fails_validate(tmp_path):
    text = REV1.read_text().replace("preset=", "preset=missing-", 1)
    assert "preset=missing-" in text
    (tmp_path / "lycoris").mkdir()
    (tmp_path / "r.toml").write_text(text)
    line = error_line(run("validate", tmp_path / "r.toml"))
    assert "no such LyCORIS preset file" in line and "missing-" in line


def test_a_data_recipe_is_named_as_one():
    line = error_line(run("validate", REPO / "recipes" / "data" / "epsilon-rev1.toml"))
    assert "a data recipe" in line and "kxl-prep prepare --recipe" in line


@pytest.mark.parametrize("argv", [["lokr-count", "--recipe", str(REV1)], ["sdxl-args"], ["lokr-plan", "--write"]])
def test_sd_scripts_commands_without_sd_scripts_say_so_in_one_line(tmp_path, argv):
    res = run(*argv, env={"KXL_SD_SCRIPTS": str(tmp_path / "nowhere")})
    assert error_line(res) == f"Error: KXL_SD_SCRIPTS={tmp_path / 'nowhere'}: does not exist"
    (tmp_path / "empty").mkdir()
    line = error_line(run(*argv, env={"KXL_SD_SCRIPTS": str(tmp_path / "empty")}))
    assert line.startswith("Error: KXL_SD_SCRIPTS=") and "does not look like sd-scripts" in line


def test_launch_refuses_a_model_that_is_not_sdxl_even_in_a_dry_run(inputs, tmp_path):
    data, _, out = inputs
    from kxl_testing.synthetic_checkpoints import lokr_plan, tiny_layout, write_lokr

    lokr = tmp_path / "lokr.safetensors"
    write_lokr(lokr, lokr_plan(tiny_layout(), factor=2))
    line = error_line(run("launch", REV1, "--dataset", data, "--model", lokr, "--output", out, "--dry-run"))
    assert f"model {lokr}: is a LoKr/LyCORIS network file, not an SDXL checkpoint" in line
    (tmp_path / "garbage.safetensors").write_bytes(b"\x93NUMPY" * 100)
    line = error_line(run("launch", REV1, "--dataset", data, "--model", tmp_path / "garbage.safetensors",
                          "--output", out, "--dry-run"))
    assert "garbage.safetensors: not a safetensors file" in line


@pytest.mark.parametrize("module", ["kxl_prep.cli", "kxl_train.cli", "kxl_tools.cli"])
def test_dash_h_works_and_help_lists_every_command(module):
    import importlib

    group = importlib.import_module(module).main
    for flag in ("-h", "--help"):
        res = CliRunner().invoke(group, [flag])
        assert res.exit_code == 0, res.output
        for name in group.commands:
            assert f"  {name} " in res.output
    if module == "kxl_tools.cli":
        assert all(name in (group.help or "") for name in group.commands)  # the summary line names each
