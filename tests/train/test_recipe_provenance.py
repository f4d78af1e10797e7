"""docs/recipe-provenance.md names a source (card / Delta script / kxl with a reason) for every key
of both recipes, with the recipe's own value."""
from __future__ import annotations

import re

import pytest

from kxl_common.upstream import REPO_ROOT
from kxl_train import recipe as rc

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DOC = REPO_ROOT / "docs" / "recipe-provenance.md"
RECIPES = {"rev1": REPO_ROOT / "recipes" / "epsilon-rev1.toml", "rev2": REPO_ROOT / "recipes" / "epsilon-rev2.toml"}
SOURCES = ("card", "Delta script", "kxl")


def cells(line: str) -> list[str]:
    """A markdown table row's cells; `\\|` is a pipe inside a cell."""
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [p.strip().replace("\\|", "|") for p in parts]


def table_of(recipe_name: str, text: str | None = None) -> dict[str, tuple[str, str, str]]:
    """{key: (value as TOML text, source, reason)} of the section titled with the recipe's path."""
    text = DOC.read_text() if text is None else text
    section = re.search(rf"^## .*`recipes/{re.escape(recipe_name)}`.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f"{DOC.name} has no section for recipes/{recipe_name}"
    rows = {}
    for line in section.group(1).splitlines():
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| key "):
            continue
        key, value, source, reason = cells(line)
        assert key not in rows, f"{recipe_name}: {key} has two rows"
        rows[key] = (value, source, reason)
    return rows


def recipe_items(path) -> dict:
    values, kxl = rc.read_recipe_file(path)
    return {**{f"kxl.{k}": v for k, v in kxl.items()}, **values}


def parse_value(cell: str):
    m = re.fullmatch(r"`(.*)`", cell)
    assert m, f"value {cell!r} is not written `TOML`"
    return tomllib.loads(f"v = {m.group(1)}")["v"]


def problems(path, rows) -> list[str]:
    items = recipe_items(path)
    out = [f"{k}: no row (add its value, source and reason)" for k in items if k not in rows]
    out += [f"{k}: a row for a key the recipe does not set" for k in rows if k not in items]
    for key in items.keys() & rows.keys():
        value, source, reason = rows[key]
        if parse_value(value) != items[key]:
            out.append(f"{key}: the table says {value}, the recipe {items[key]!r}")
        if source not in SOURCES:
            out.append(f"{key}: source {source!r} is not one of {SOURCES}")
        if source == "kxl" and not reason:
            out.append(f"{key}: a kxl choice needs its reason")
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_key_has_its_source(name):
    path = RECIPES[name]
    assert problems(path, table_of(path.name)) == []


def test_the_check_catches_a_missing_row_a_wrong_value_and_a_bare_kxl_choice():
    path = RECIPES["rev1"]
    rows = table_of(path.name)
    broken = dict(rows)
    del broken["max_token_length"]
    broken["seed"] = ("`0`",) + rows["seed"][1:]
    broken["save_state"] = (rows["save_state"][0], "kxl", "")
    broken["sdpa"] = ("`true`", "kxl", "stale")
    assert sorted(problems(path, broken)) == sorted([
        "max_token_length: no row (add its value, source and reason)",
        "sdpa: a row for a key the recipe does not set",
        "seed: the table says `0`, the recipe 1337",
        "save_state: a kxl choice needs its reason"])


def test_escaped_pipes_parse_as_the_recipe_value():
    row = cells('| keep_tokens_separator | `"\\|\\|\\|"` | Delta script | x |')
    assert parse_value(row[1]) == "|||"
