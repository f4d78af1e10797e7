"""The data recipe's selector "tags" (`[selection] method = "tags"`): the rules of
kxl_prep.tags.rules through select_by_tags, with the tag report as the selection's details.
kxl_prep.select registers it with the other selectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kxl_prep.recipe import RecipeError
from kxl_prep.schema import TAG_COLUMNS
from kxl_prep.selector_base import SelectContext, Selection
from kxl_prep.tags.report import build_tag_report
from kxl_prep.tags.rules import METHOD, TagRecipeError, parse_tag_selection
from kxl_prep.tags.select import select_by_tags

# The post columns the selector reads (the pipeline hands it no others).
COLUMNS = ("id", "rating", "year", *TAG_COLUMNS)

__all__ = ["COLUMNS", "METHOD", "tags_selector"]


def tags_selector(posts: pd.DataFrame, params: dict, ctx: SelectContext) -> Selection:
    """`[selection] method = "tags"`: the rules of kxl_prep.tags.rules, through select_by_tags.

    Groups are the rules; a post selected by several rules counts in `selected` of the first
    of them (so the groups add up to the union); `sampled` counts every post a rule kept.
    `details(kept_positions)` gives the full report (kxl_prep.tags.report) for the manifest.
    """
    base_dir = Path(ctx.recipe_path).parent if ctx.recipe_path else Path.cwd()
    try:
        spec = parse_tag_selection(params, base_dir=base_dir, seed=ctx.seed).scaled(ctx.count_scale)
        result = select_by_tags(posts, spec, progress=ctx.progress)
    except TagRecipeError as exc:
        raise RecipeError(str(exc)) from exc
    membership = result.rule_membership()
    first_rule = membership.argmax(axis=1).astype(np.int32) if len(spec.rules) else np.zeros(0, np.int32)
    attributed = np.bincount(first_rule, minlength=len(spec.rules))
    groups = []
    for i, (rule, outcome) in enumerate(zip(spec.rules, result.rules)):
        eligible = int(outcome.eligible.sum())
        groups.append(
            {
                "range": f"rule {rule.name}",
                "rule": rule.name,
                "kind": rule.kind(),
                "requested": rule.cap,
                "matched": int(outcome.matched.sum()),
                "available": eligible,
                "sampled": int(outcome.sampled.sum()),
                "selected": int(attributed[i]),
                "short": 0 if rule.cap is None else max(0, rule.cap - eligible),
            }
        )
    # Only what the report needs is kept alive (not the posts table).
    columns = posts[["rating", "year"]].copy()

    def details(kept_positions: np.ndarray) -> dict:
        return build_tag_report(columns, result, kept_rows=np.sort(np.asarray(kept_positions, dtype=np.int64)))

    return Selection(result.rows.astype(np.int64), first_rule, groups, details=details)
