"""Tag selection rules of a data recipe: the model, parsing, normalization and validation.

A data recipe selects posts by tags with `method = "tags"` in its `[selection]` table
(Epsilon rev2):

    seed = 2024                      # the recipe's seed (kxl-prep --seed overrides it)

    [selection]
    method = "tags"

    [[selection.rules]]
    name = "artists"
    artists_file = "rev2/artists.txt"   # one tag per line, relative to the recipe file
    cap = 900000                        # optional: at most this many posts, seeded sampling

    [[selection.rules]]
    name = "figure-photos"
    all_of = ["photo_(medium)", "figure"]

    [selection.exclude]
    tags = ["ai-generated"]

Rule keys (every list may be given inline, as `<key>_file` (a path or a list of paths), or
both; the tags are merged):
- `artists`, `copyrights`, `characters`: the post has ANY of these tags in that category;
- `all_of` / `any_of` / `none_of`: a tag expression over the post's tags of every category.
A post matches a rule when it meets every positive criterion the rule gives (AND), and has
none of `none_of`. The selection is the union of the rules, without duplicates.
`[selection.exclude]` (keys `artists`, `copyrights`, `characters`, `tags`, `ids`,
each with `_file`) removes posts from every rule BEFORE the caps are applied.

Tag names are normalized the way Danbooru stores them (`normalize_tag`), and every tag must
exist in the source in the category where it is looked for: `validate_against_vocabulary`
raises `UnknownTagsError` listing each missing tag with the closest existing names.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kxl_common.errors import KxlError
from kxl_common.toml_file import read_toml
from kxl_prep.schema import TAG_CATEGORIES

# Rule keys that name tags of one category, -> that category.
CATEGORY_KEYS = {"artists": "artist", "copyrights": "copyright", "characters": "character"}
EXPRESSION_KEYS = ("all_of", "any_of", "none_of")
LIST_KEYS = (*CATEGORY_KEYS, *EXPRESSION_KEYS)
RULE_KEYS = {"name", "cap", *LIST_KEYS, *(f"{k}_file" for k in LIST_KEYS)}
EXCLUDE_LIST_KEYS = (*CATEGORY_KEYS, "tags")
EXCLUDE_KEYS = {*EXCLUDE_LIST_KEYS, "ids", *(f"{k}_file" for k in (*EXCLUDE_LIST_KEYS, "ids"))}
SELECTION_KEYS = {"method", "rules", "exclude"}
METHOD = "tags"

_WS = re.compile(r"\s+")
SHOWN_UNKNOWN = 100  # unknown tags listed in the error message (all are in .problems)


class TagRecipeError(KxlError, ValueError):
    """A malformed tag `[selection]` table: names the rule, the key and the reason."""


class UnknownTagsError(TagRecipeError):
    """Tags named by the recipe that do not exist in the source (with suggestions)."""

    def __init__(self, problems: Sequence["UnknownTag"]):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} tag(s) named by the data recipe do not exist in the source:"]
        lines += [f"  - {p.describe()}" for p in self.problems[:SHOWN_UNKNOWN]]
        if len(self.problems) > SHOWN_UNKNOWN:
            lines.append(f"  ... and {len(self.problems) - SHOWN_UNKNOWN} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class UnknownTag:
    where: str  # e.g. "rule 'artists' key 'artists'" or "exclude key 'tags'"
    tag: str
    category: str | None  # the category it was looked up in; None = any category
    suggestions: tuple[str, ...]
    found_in: tuple[str, ...]  # categories where the name does exist (wrong category)

    def describe(self) -> str:
        scope = f"{self.category} tag" if self.category else "tag"
        text = f"{self.where}: {scope} {self.tag!r} not found"
        if self.found_in:
            text += f" (it exists as a {' / '.join(self.found_in)} tag)"
        if self.suggestions:
            text += "; closest: " + ", ".join(self.suggestions)
        return text


def normalize_tag(text: str) -> str:
    """Danbooru's spelling of a tag name: lower case, spaces -> underscores, no escapes.

    Accepts what users paste from prompts or wikis: "Hatsune Miku", "photo \\(medium\\)",
    "  figure ". Underscores already present are kept ("^_^" stays "^_^").
    """
    text = text.strip().replace("\\(", "(").replace("\\)", ")")
    return _WS.sub("_", text).lower()


def read_tag_file(path: Path) -> list[str]:
    """One tag per line. Blank lines are skipped, and so are comments: lines that are "#"
    alone or start with "# " (tags such as "#compass" start with '#', so a comment needs
    the space)."""
    tags = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped == "#" or stripped.startswith("# "):
            continue
        tags.append(normalize_tag(stripped))
    return tags


def _category_lists(criteria) -> dict[str, tuple[str, ...]]:
    """Category -> tags of the `artists` / `copyrights` / `characters` lists that are set."""
    return {cat: getattr(criteria, key) for key, cat in CATEGORY_KEYS.items() if getattr(criteria, key)}


@dataclass(frozen=True)
class TagRule:
    """One include rule. Empty tuples mean "criterion not used"."""

    name: str
    artists: tuple[str, ...] = ()
    copyrights: tuple[str, ...] = ()
    characters: tuple[str, ...] = ()
    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    cap: int | None = None  # None: every matching post

    def category_lists(self) -> dict[str, tuple[str, ...]]:
        """Category -> tags, for the `artists` / `copyrights` / `characters` criteria used."""
        return _category_lists(self)

    def kind(self) -> str:
        """Short description for reports, e.g. "artists" or "all_of+none_of"."""
        return "+".join(k for k in LIST_KEYS if getattr(self, k)) or "empty"

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind(), "cap": self.cap}
        for key in LIST_KEYS:
            tags = getattr(self, key)
            if tags:
                out[key] = {"count": len(tags), "tags": list(tags)}
        return out


@dataclass(frozen=True)
class TagExclusion:
    """Posts removed from every rule before the caps: ANY listed tag, or a listed id."""

    artists: tuple[str, ...] = ()
    copyrights: tuple[str, ...] = ()
    characters: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # any category
    ids: tuple[int, ...] = ()

    def category_lists(self) -> dict[str, tuple[str, ...]]:
        return _category_lists(self)

    def is_empty(self) -> bool:
        return not (self.artists or self.copyrights or self.characters or self.tags or self.ids)

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in EXCLUDE_LIST_KEYS:
            tags = getattr(self, key)
            if tags:
                out[key] = {"count": len(tags), "tags": list(tags)}
        if self.ids:
            out["ids"] = {"count": len(self.ids)}
        return out


@dataclass(frozen=True)
class TagSelectionSpec:
    rules: tuple[TagRule, ...]
    exclude: TagExclusion = field(default_factory=TagExclusion)
    seed: int = 0

    def scaled(self, factor: float) -> "TagSelectionSpec":
        """Caps multiplied by `factor` (rounded to nearest): a full-size recipe on a sample."""
        if factor == 1.0:
            return self
        rules = tuple(
            dataclasses.replace(r, cap=None if r.cap is None else int(round(r.cap * factor))) for r in self.rules
        )
        return dataclasses.replace(self, rules=rules)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rules": [r.to_manifest() for r in self.rules],
            "exclude": self.exclude.to_manifest(),
        }


# ---------------------------------------------------------------- parsing


def _tag_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TagRecipeError(f"{where}: expected a list of tag names (strings), got {value!r}")
    return [normalize_tag(v) for v in value]


def _file_list(value: Any, where: str, base_dir: Path) -> list[Path]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise TagRecipeError(f"{where}: expected a file path or a list of file paths, got {value!r}")
    out = []
    for p in paths:
        path = Path(p) if Path(p).is_absolute() else base_dir / p
        if not path.is_file():
            raise TagRecipeError(f"{where}: list file {str(path)!r} does not exist")
        out.append(path)
    return out


def _gather(table: Mapping[str, Any], key: str, where: str, base_dir: Path) -> tuple[str, ...]:
    """Inline `key` plus `key_file` lists, normalized, duplicates removed, order kept."""
    tags: list[str] = []
    if key in table:
        tags += _tag_list(table[key], f"{where} key {key!r}")
    if f"{key}_file" in table:
        for path in _file_list(table[f"{key}_file"], f"{where} key '{key}_file'", base_dir):
            tags += read_tag_file(path)
    empty = [t for t in tags if not t]
    if empty:
        raise TagRecipeError(f"{where} key {key!r}: empty tag name")
    return tuple(dict.fromkeys(tags))


def _gather_ids(table: Mapping[str, Any], where: str, base_dir: Path) -> tuple[int, ...]:
    ids: list[int] = []
    if "ids" in table:
        value = table["ids"]
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TagRecipeError(f"{where} key 'ids': expected a list of post ids (integers)")
        ids += value
    if "ids_file" in table:
        for path in _file_list(table["ids_file"], f"{where} key 'ids_file'", base_dir):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    ids.append(int(line))
                except ValueError:
                    raise TagRecipeError(f"{path}:{n}: not a post id: {line!r}") from None
    return tuple(sorted(set(ids)))


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TagRecipeError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(sorted(allowed))}")


def parse_rule(table: Mapping[str, Any], index: int, base_dir: Path) -> TagRule:
    if not isinstance(table, Mapping):
        raise TagRecipeError(f"selection.rules[{index}]: expected a table, got {table!r}")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TagRecipeError(f"selection.rules[{index}]: every rule needs a non-empty 'name'")
    where = f"rule {name!r}"
    _check_keys(table, RULE_KEYS, where)
    lists = {key: _gather(table, key, where, base_dir) for key in LIST_KEYS}
    cap = table.get("cap")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
        raise TagRecipeError(f"{where} key 'cap': expected a non-negative integer, got {cap!r}")
    positive = [k for k in (*CATEGORY_KEYS, "all_of", "any_of") if lists[k]]
    if not positive:
        raise TagRecipeError(
            f"{where}: needs at least one non-empty include list "
            "(artists, copyrights, characters, all_of or any_of)"
        )
    clash = set(lists["none_of"]) & (set(lists["all_of"]) | set(lists["any_of"]))
    if clash:
        raise TagRecipeError(f"{where}: tag(s) {sorted(clash)} are both required and forbidden")
    return TagRule(name=name, cap=cap, **lists)


def parse_exclusion(table: Mapping[str, Any] | None, base_dir: Path) -> TagExclusion:
    if table is None:
        return TagExclusion()
    if not isinstance(table, Mapping):
        raise TagRecipeError(f"selection.exclude: expected a table, got {table!r}")
    where = "selection.exclude"
    _check_keys(table, EXCLUDE_KEYS, where)
    lists = {key: _gather(table, key, where, base_dir) for key in EXCLUDE_LIST_KEYS}
    return TagExclusion(ids=_gather_ids(table, where, base_dir), **lists)


def parse_tag_selection(table: Mapping[str, Any], *, base_dir: str | Path, seed: int) -> TagSelectionSpec:
    """Parse the `[selection]` table of a data recipe whose method is "tags" (the `method`
    key may be present or already removed); list files are relative to `base_dir` (the
    recipe's folder); `seed` is the recipe's seed."""
    base = Path(base_dir)
    if not isinstance(table, Mapping):
        raise TagRecipeError(f"selection: expected a table, got {table!r}")
    _check_keys(table, SELECTION_KEYS, "selection (tags)")
    if table.get("method", METHOD) != METHOD:
        raise TagRecipeError(f"selection.method: expected {METHOD!r}, got {table['method']!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TagRecipeError(f"seed: expected the recipe's non-negative integer seed, got {seed!r}")
    raw_rules = table.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise TagRecipeError("selection: needs at least one [[selection.rules]] entry")
    rules = tuple(parse_rule(r, i, base) for i, r in enumerate(raw_rules))
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TagRecipeError(f"selection: rule names must be unique; repeated: {dupes}")
    return TagSelectionSpec(rules=rules, exclude=parse_exclusion(table.get("exclude"), base), seed=seed)


def load_tag_selection(recipe_path: str | Path, *, seed: int | None = None) -> TagSelectionSpec:
    """Read the tag `[selection]` of a data recipe TOML; `seed` overrides the recipe's."""
    path = Path(recipe_path)
    data = read_toml(path, what="data recipe", error=TagRecipeError)
    selection = data.get("selection")
    if not isinstance(selection, Mapping) or selection.get("method") != METHOD:
        raise TagRecipeError(f"{path}: no [selection] table with method = {METHOD!r}")
    seed = data.get("seed", 0) if seed is None else seed
    return parse_tag_selection(selection, base_dir=path.parent, seed=seed)


# ---------------------------------------------------------------- validation


MAX_SUGGESTED = 50  # unknown tags that get suggestions (a wrong list can hold thousands)


class _Suggester:
    """Closest existing names for a misspelt tag (difflib ratio), fast on 10^5-10^6 names:
    candidates are the names sharing the most 3-character pieces with the tag (an index of
    pieces is built once, only when some tag is unknown), then difflib ranks those."""

    POOL = 300

    def __init__(self, names: Iterable[str]):
        self.names = sorted(names)
        self._grams: dict[str, list[int]] | None = None

    @staticmethod
    def grams(text: str) -> set[str]:
        padded = f"^{text}$"
        return {padded[i : i + 3] for i in range(len(padded) - 2)}

    def suggest(self, tag: str, n: int = 3) -> tuple[str, ...]:
        if len(self.names) <= 2 * self.POOL:
            pool = self.names
        else:
            if self._grams is None:
                self._grams = {}
                for i, name in enumerate(self.names):
                    for g in self.grams(name):
                        self._grams.setdefault(g, []).append(i)
            shared: dict[int, int] = {}
            for g in self.grams(tag):
                for i in self._grams.get(g, ()):
                    shared[i] = shared.get(i, 0) + 1
            best = sorted(shared, key=lambda i: (-shared[i], i))[: self.POOL]
            pool = [self.names[i] for i in best]
        return tuple(difflib.get_close_matches(tag, pool, n=n, cutoff=0.6))


def validate_against_vocabulary(
    spec: TagSelectionSpec, vocabulary: Mapping[str, Iterable[str]] | Mapping[str, set[str]]
) -> None:
    """Raise UnknownTagsError unless every tag exists in the category it is looked up in.

    `vocabulary`: category (one of TAG_CATEGORIES) -> the set of tag names the source uses.
    Category lists (artists/copyrights/characters) must exist in that category; expression
    tags (all_of/any_of/none_of, exclude.tags) may be in any category. The first
    MAX_SUGGESTED unknown tags get the closest existing names.
    """
    vocab = {c: v if isinstance(v, (set, frozenset, dict)) else set(v) for c, v in vocabulary.items()}
    suggesters: dict[str | None, _Suggester] = {}

    def suggest(tag: str, category: str | None) -> tuple[str, ...]:
        if category not in suggesters:
            names = set().union(*vocab.values()) if category is None else vocab.get(category, ())
            suggesters[category] = _Suggester(names)
        return suggesters[category].suggest(tag)

    problems: list[UnknownTag] = []

    def check(tags: Iterable[str], category: str | None, where: str) -> None:
        for tag in tags:
            if category is None:
                if any(tag in v for v in vocab.values()):
                    continue
                found: tuple[str, ...] = ()
            else:
                if tag in vocab.get(category, ()):
                    continue
                found = tuple(c for c in TAG_CATEGORIES if c != category and tag in vocab.get(c, ()))
            close = suggest(tag, category) if len(problems) < MAX_SUGGESTED else ()
            problems.append(UnknownTag(where, tag, category, close, found))

    for rule in spec.rules:
        for key, cat in CATEGORY_KEYS.items():
            check(getattr(rule, key), cat, f"rule {rule.name!r} key {key!r}")
        for key in EXPRESSION_KEYS:
            check(getattr(rule, key), None, f"rule {rule.name!r} key {key!r}")
    for key, cat in CATEGORY_KEYS.items():
        check(getattr(spec.exclude, key), cat, f"exclude key {key!r}")
    check(spec.exclude.tags, None, "exclude key 'tags'")
    if problems:
        raise UnknownTagsError(problems)
