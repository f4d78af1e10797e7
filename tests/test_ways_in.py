"""The ways into the product are the ones README lists: the console scripts (kxl-prep,
kxl-train, kxl: each `python -m` of its cli module too), prepare_dataset.py, launch/*.sh, plus
the two modules run by tools rather than by hand (accelerate starts kxl_train.entry,
setup.sh runs kxl_common.check_env). No other product module is runnable on its own."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("kxl_common", "kxl_prep", "kxl_train", "kxl_tools")
CONSOLE_SCRIPTS = {"kxl-prep": "kxl_prep.cli:main", "kxl-train": "kxl_train.cli:main", "kxl": "kxl_tools.cli:main"}
RUN_BY_TOOLS = {"kxl_train.entry", "kxl_common.check_env"}


def has_main_block(path: Path) -> bool:
    """`if __name__ == "__main__":` at module level."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)):
            return True
    return False


def test_console_scripts_are_the_three_listed():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"] == CONSOLE_SCRIPTS


def test_no_other_product_module_has_a_main_block():
    runnable = {".".join(path.relative_to(REPO).with_suffix("").parts)
                for package in PRODUCT for path in sorted((REPO / package).rglob("*.py")) if has_main_block(path)}
    clis = {target.split(":")[0] for target in CONSOLE_SCRIPTS.values()}
    assert runnable == clis | RUN_BY_TOOLS


def test_main_block_detection(tmp_path):
    yes, no = tmp_path / "yes.py", tmp_path / "no.py"
    yes.write_text('import sys\nif __name__ == "__main__":\n    sys.exit(0)\n', encoding="utf-8")
    no.write_text('def f():\n    if __name__ == "__main__":\n        pass\nname = "__main__"\n', encoding="utf-8")
    assert has_main_block(yes) and not has_main_block(no)
