"""Selecting posts by tag rules (the Epsilon rev2 data recipe, `[selection] method = "tags"`).

rules     the `[selection]` rules table: parsing, tag files, checks against the source's tags
select    TagIndex and select_by_tags: every rule matched and capped over millions of posts
report    the report of a selection: matches, overlaps, final counts per rule, rating, year
selector  the data recipe's selector "tags" (registered in kxl_prep.select)
cli       `kxl-prep select-tags`: the dry run
"""
