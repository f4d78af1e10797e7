"""Anchored edits of an sd-scripts function: its own source with exact text replaced, compiled in
its own module, so a patch changes one line of the pinned code instead of copying the function.

Each anchor must occur exactly once, else the sd-scripts is not the pinned one and the patch is
refused. Replacements keep the line count, so tracebacks still point at sd-scripts' lines.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

from kxl_train.resume.items import PatchError

PINNED = "v0.10.1 (ae72efb9)"


def edit_function(original, edits, what: str):
    """A copy of `original` with each (anchor, replacement) of `edits` applied, compiled with
    original's globals (names it looks up at run time resolve in sd-scripts' module, patched or
    not); `edited._kxl_original` is `original`. `what` names the patch in the refusal."""
    lines, first_line = inspect.getsourcelines(original)
    source = textwrap.dedent("".join(lines))
    for anchor, replacement in edits:
        count = source.count(anchor)
        if count != 1:
            raise PatchError(f"{what}: expected exactly one {anchor.strip()!r} in {original.__qualname__}, "
                             f"found {count}; this sd-scripts is not {PINNED}")
        if anchor.count("\n") != replacement.count("\n"):
            raise ValueError(f"{what}: a replacement must keep the line count of {anchor!r}")
        source = source.replace(anchor, replacement)
    tree = ast.parse(source)
    ast.increment_lineno(tree, first_line - 1)
    code = compile(tree, inspect.getsourcefile(original), "exec")
    namespace: dict = {}
    exec(code, original.__globals__, namespace)  # noqa: S102 - our edited copy of the pinned function
    edited = namespace[original.__name__]
    edited.__qualname__ = original.__qualname__
    edited._kxl_original = original
    return edited


def check_anchors(modules: dict, anchors: dict, what: str, fix: str = "") -> None:
    """Refuse an sd-scripts that is not the pinned one: every text of `anchors` ({"module.Class.func":
    (text, ...)}) must stand in that function's source (its original, where one of kxl's patches
    already replaced it). `what` names the patch and `fix` says what to do instead."""
    for where, texts in anchors.items():
        module_name, *attrs = where.split(".")
        obj = modules[module_name]
        for attr in attrs:
            obj = getattr(obj, attr)
        source = inspect.getsource(getattr(obj, "_kxl_original", obj))
        for text in texts:
            if text not in source:
                raise PatchError(f"{what}: {text!r} not found in {where}; this sd-scripts is not {PINNED}"
                                 + (f" ({fix})" if fix else ""))
