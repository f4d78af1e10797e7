"""--kxl-keep-caption-suffix (recipe `[kxl] keep_caption_suffix = true`): a caption longer than
sd-scripts' token budget drops general tags instead of the end of its fixed suffix.

sd-scripts v0.10.1 keeps the first max_token_length content tokens of a caption (75 unset; 150
or 225) and drops the rest (library/strategy_base.py TokenizeStrategy._get_input_ids). Epsilon
captions put the quality, year, meta and rating tags LAST (`prefix ||| general ||| suffix`), so
a long caption loses them (kxl-prep's report counts how many: docs/captions-token-budget.md).

The patch edits one line of BaseDataset.process_caption (library/train_util.py): where it joins
`fixed_tokens + flex_tokens + fixed_suffix_tokens` with ", " after shuffling and tag dropout,
the join goes through fit_caption. A caption that fits is that same join: the same text, and
every random draw (shuffle, dropout, and exact resume's caption RNG) is made as before, since
they all happen before that line. A caption over the budget keeps the longest run of its
(already shuffled and tag-dropped) general tags, from the front, that fits with the whole
prefix and suffix: with shuffle_caption the dropped tags are a random choice. A caption whose
prefix and suffix alone exceed the budget keeps no general tag and is then cut by sd-scripts
as before. Captions without a second `|||` (no suffix) are left alone.

Counted as sd-scripts' tokenizer counts (the tokenize strategy's first CLIP tokenizer, the one
it tokenizes the caption with; both share one vocabulary), on the text after process_caption's
secondary_separator replacement. Not for the reproduction's recipes: the card's training cut
captions as sd-scripts does.
"""
from __future__ import annotations

import logging

from kxl_train.attribute_patches import AttributePatches
from kxl_train import source_edits
from kxl_train.source_edits import edit_function

logger = logging.getLogger("kxl.captions")

FIT_NAME = "_kxl_fit_caption"
WHAT = "kxl keep caption suffix"
JOIN = 'caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)'
EDITS = ((JOIN, f"caption = {FIT_NAME}(self, subset, fixed_tokens, flex_tokens, fixed_suffix_tokens)"),)
# What the budget rests on: sd-scripts' tokenize strategy and how it truncates.
ANCHORS = {
    "strategy_sdxl.SdxlTokenizeStrategy.__init__": ("self.max_length = self.tokenizer1.model_max_length",
                                                   "self.max_length = max_length + 2"),
    "strategy_base.TokenizeStrategy._get_input_ids": (
        'tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")',),
    "train_util.BaseDataset.__getitem__": (
        "caption = self.process_caption(subset, image_info.caption)",
        "input_ids = [ids[0] for ids in self.tokenize_strategy.tokenize(caption)]"),
}


def check_anchors(modules: dict) -> None:
    source_edits.check_anchors(modules, ANCHORS, WHAT)


def token_budget(strategy) -> tuple[object, int] | None:
    """(tokenizer, content tokens kept) of sd-scripts' tokenize strategy, None if it has no CLIP one."""
    tokenizer = getattr(strategy, "tokenizer1", None) or getattr(strategy, "tokenizer", None)
    max_length = getattr(strategy, "max_length", None)
    if tokenizer is None or max_length is None:
        return None
    return tokenizer, int(max_length) - 2  # BOS and EOS


class _Fit:
    """fit_caption with its once-only warning."""

    def __init__(self) -> None:
        self.warned_unfit = False

    def __call__(self, dataset, subset, fixed: list[str], flex: list[str], suffix: list[str]) -> str:
        caption = ", ".join(fixed + flex + suffix)  # sd-scripts' own line
        budget = token_budget(getattr(dataset, "tokenize_strategy", None))
        if not suffix or not flex or budget is None:
            return caption
        tokenizer, limit = budget
        secondary = getattr(subset, "secondary_separator", None)

        def fits(kept: int) -> bool:
            text = ", ".join(fixed + flex[:kept] + suffix)
            if secondary:  # process_caption replaces it after the join
                text = text.replace(secondary, subset.caption_separator)
            return len(tokenizer.tokenize(text)) <= limit

        if fits(len(flex)):
            return caption
        low, high = 0, len(flex) - 1  # the count only grows with each tag kept: bisect
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        if low == 0 and not fits(0) and not self.warned_unfit:
            self.warned_unfit = True
            logger.warning("%s: a caption's prefix and suffix alone exceed %d tokens; sd-scripts cuts it (%r)",
                           WHAT, limit, caption[:200])
        return ", ".join(fixed + flex[:low] + suffix)


def install(kxl_options: dict, argv: list) -> AttributePatches | None:
    if not kxl_options.get("keep_caption_suffix"):
        return None
    from library import strategy_base, strategy_sdxl, train_util

    check_anchors({"strategy_base": strategy_base, "strategy_sdxl": strategy_sdxl, "train_util": train_util})
    patches = AttributePatches()
    edited = edit_function(train_util.BaseDataset.process_caption, EDITS, WHAT)
    patches.replace(train_util, FIT_NAME, _Fit())
    patches.replace(train_util.BaseDataset, "process_caption", edited)
    logger.info("%s: captions over the token budget drop general tags, not their suffix", WHAT)
    return patches
