"""Data recipes: which posts to take and how to caption and bucket them, as a TOML file.

A recipe has these tables (every key is checked; unknown keys are an error so a typo never
silently falls back to a default):

    name, seed
    [selection]   method = "<selector>" plus that selector's own keys (see kxl_prep.select)
    [filters]     which posts to drop, and whether before or after sampling
    [captions]    tag rules, [captions.rating], [captions.year]
    [quality]     fav_count percentiles -> quality tags
    [buckets]     sd-scripts aspect-ratio buckets
    [dataset]     what goes into the sd-scripts dataset.toml
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kxl_common.errors import KxlError
from kxl_common.toml_file import read_toml
from kxl_prep.schema import RATINGS
from kxl_prep.tokens import check_max_token_length

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "recipes" / "data"
DEFAULT_RECIPE = RECIPES_DIR / "epsilon-rev1.toml"

FILTER_TIMINGS = ("after-sampling", "before-sampling")

PEOPLE_COUNT_TAGS = (
    *(f"{n}girl{'s' if n != '1' else ''}" for n in ("1", "2", "3", "4", "5", "6+")),
    "multiple_girls",
    *(f"{n}boy{'s' if n != '1' else ''}" for n in ("1", "2", "3", "4", "5", "6+")),
    "multiple_boys",
    *(f"{n}other{'s' if n != '1' else ''}" for n in ("1", "2", "3", "4", "5", "6+")),
    "multiple_others",
)
META_NOISE = (
    "(medium)",
    "commentary",
    "bad",
    "translat",
    "request",
    "mismatch",
    "revision",
    "audio",
    "video",
)


class RecipeError(KxlError, ValueError):
    """A recipe that cannot be used; the message names the file, the key and the reason."""


@dataclass(frozen=True)
class FilterSpec:
    deleted: bool = True
    banned: bool = True
    restricted: bool = True  # gold-only posts: no md5 or no file_url in the public dump
    allowed_ext: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    # "after-sampling": quotas are drawn from every post, then filters drop posts (the card's
    # 5.35M -> 5.21M). "before-sampling": quotas are filled from posts that pass the filters.
    apply: str = "after-sampling"


@dataclass(frozen=True)
class RatingTags:
    general: tuple[str, ...] = ("safe",)
    sensitive: tuple[str, ...] = ("sensitive",)
    questionable: tuple[str, ...] = ("nsfw",)
    explicit: tuple[str, ...] = ("nsfw", "explicit")

    def for_rating(self, rating: str) -> tuple[str, ...]:
        return getattr(self, rating)


@dataclass(frozen=True)
class YearBins:
    # year <= edges[i] -> labels[i]; a year after the last edge -> labels[-1]
    edges: tuple[int, ...] = (2010, 2014, 2017, 2020)
    labels: tuple[str, ...] = ("old", "early", "mid", "recent", "newest")


@dataclass(frozen=True)
class CaptionSpec:
    keep_tokens_separator: str = "|||"
    tag_separator: str = ", "
    # Raw Danbooru names, in caption order (girls, boys, others; by count within each family).
    people_count_tags: tuple[str, ...] = PEOPLE_COUNT_TAGS
    # Tags never written in any section (Danbooru's `banned_artist` marks a banned artist,
    # it is not an artist name; it is an artist or a meta tag depending on the dump's age).
    drop_tags: tuple[str, ...] = ("banned_artist",)
    # Meta tags whose name contains any of these substrings are noise and dropped.
    meta_noise: tuple[str, ...] = META_NOISE
    # Names this long or shorter keep their underscores (emoticons: ^_^, o_o).
    keep_underscores_max_len: int = 3
    rating: RatingTags = field(default_factory=RatingTags)
    year: YearBins = field(default_factory=YearBins)
    # The token budget prepare counts the captions against (kxl_prep.tokens): it must equal the
    # training recipe's max_token_length (sd-scripts: 75 = unset, 150 or 225; the author's
    # script and the reproduction's recipes use 225).
    max_token_length: int = 225


@dataclass(frozen=True)
class QualitySpec:
    column: str = "fav_count"
    # Thresholds numpy.percentile(column, percentiles) per rating; a post strictly above
    # thresholds[i] (first match) gets labels[i]; otherwise labels[-1].
    percentiles: tuple[float, ...] = (90.0, 75.0, 60.0, 45.0, 30.0, 10.0)
    labels: tuple[str, ...] = (
        "masterpiece",
        "best quality",
        "great quality",
        "good quality",
        "normal quality",
        "low quality",
        "worst quality",
    )


@dataclass(frozen=True)
class BucketSpec:
    resolution: tuple[int, int] = (1024, 1024)
    min_reso: int = 256
    max_reso: int = 4096
    step: int = 64


@dataclass(frozen=True)
class DatasetSpec:
    """The sd-scripts dataset.toml written beside meta.json."""

    shuffle_caption: bool = True
    caption_tag_dropout_rate: float = 0.15
    # image_dir in dataset.toml; relative paths are taken from the output directory.
    image_dir: str = "images"


@dataclass(frozen=True)
class DataRecipe:
    name: str = "unnamed"
    seed: int = 0
    selection: dict[str, Any] = field(default_factory=lambda: {"method": "all"})
    filters: FilterSpec = field(default_factory=FilterSpec)
    captions: CaptionSpec = field(default_factory=CaptionSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    buckets: BucketSpec = field(default_factory=BucketSpec)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    source: str | None = None  # file it was read from

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return _jsonable(data)

    def digest(self) -> str:
        """sha256 of the resolved recipe (what actually ran), for the manifest."""
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def replace(self, **changes: Any) -> "DataRecipe":
        return dataclasses.replace(self, **changes)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _build(cls: type, table: Any, where: str) -> Any:
    """Dataclass from a TOML table, checking keys and value types."""
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: expected a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    defaults = cls()
    kwargs = {}
    for name, value in table.items():
        default = getattr(defaults, name)
        key = f"{where}.{name}"
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, key)
        elif isinstance(default, tuple):
            if not isinstance(value, list):
                raise RecipeError(f"{key}: expected a list, got {value!r}")
            item_type = type(default[0]) if default else None
            items = []
            for item in value:
                if item_type is float and isinstance(item, int) and not isinstance(item, bool):
                    item = float(item)
                if item_type is not None and not isinstance(item, item_type):
                    raise RecipeError(f"{key}: expected {item_type.__name__} items, got {item!r}")
                items.append(item)
            kwargs[name] = tuple(items)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise RecipeError(f"{key}: expected true or false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{key}: expected a number, got {value!r}")
            kwargs[name] = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise RecipeError(f"{key}: expected an integer, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise RecipeError(f"{key}: expected a string, got {value!r}")
            kwargs[name] = value
        else:
            kwargs[name] = value
    return cls(**kwargs)


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> DataRecipe:
    if "name" not in data:
        raise RecipeError(f"{where}: missing key 'name'")
    data = dict(data)
    selection = data.pop("selection", {"method": "all"})
    if not isinstance(selection, dict) or "method" not in selection:
        raise RecipeError(f"{where}.selection: needs a 'method' key naming the selector")
    recipe = _build(DataRecipe, data, where)
    recipe = dataclasses.replace(recipe, selection=selection)
    validate(recipe, where)
    return recipe


def load_recipe(path: str | Path | None = None) -> DataRecipe:
    """Read and validate a data recipe; None means the shipped Epsilon rev1 recipe."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    if not path.is_file():
        shipped = RECIPES_DIR / f"{path}.toml"
        if shipped.is_file():  # a shipped recipe by name: "epsilon-rev1"
            path = shipped
        elif path.is_dir():
            raise RecipeError(f"{path}: is a folder, not a recipe file")
        else:
            raise RecipeError(f"{path}: no such recipe file (nor a shipped recipe of that name)")
    data = read_toml(path, what="data recipe", error=RecipeError)
    recipe = recipe_from_dict(data, where=str(path))
    return dataclasses.replace(recipe, source=str(path))


def validate(recipe: DataRecipe, where: str = "recipe") -> None:
    if recipe.seed < 0:
        raise RecipeError(f"{where}.seed: must be >= 0, got {recipe.seed}")
    f = recipe.filters
    if f.apply not in FILTER_TIMINGS:
        raise RecipeError(f"{where}.filters.apply: must be one of {FILTER_TIMINGS}, got {f.apply!r}")
    bad_ext = [e for e in f.allowed_ext if e != e.lower() or e.startswith(".") or not e]
    if bad_ext:
        raise RecipeError(f"{where}.filters.allowed_ext: write extensions lower case without a dot: {bad_ext}")
    c = recipe.captions
    if not c.keep_tokens_separator.strip():
        raise RecipeError(f"{where}.captions.keep_tokens_separator: must not be blank")
    if c.tag_separator.strip() != ",":
        raise RecipeError(
            f"{where}.captions.tag_separator: sd-scripts splits captions on ','; "
            f"use ', ' (got {c.tag_separator!r})"
        )
    if len(c.year.labels) != len(c.year.edges) + 1:
        raise RecipeError(f"{where}.captions.year: needs one more label than edges")
    if list(c.year.edges) != sorted(set(c.year.edges)):
        raise RecipeError(f"{where}.captions.year.edges: must be strictly increasing")
    try:
        check_max_token_length(c.max_token_length, f"{where}.captions.max_token_length")
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    q = recipe.quality
    if len(q.labels) != len(q.percentiles) + 1:
        raise RecipeError(f"{where}.quality: needs one more label than percentiles")
    if any(not 0 <= p <= 100 for p in q.percentiles):
        raise RecipeError(f"{where}.quality.percentiles: must lie in [0, 100]")
    if q.column not in ("fav_count", "score"):
        raise RecipeError(f"{where}.quality.column: 'fav_count' or 'score', got {q.column!r}")
    b = recipe.buckets
    if len(b.resolution) != 2 or min(b.resolution) <= 0:
        raise RecipeError(f"{where}.buckets.resolution: two positive integers [w, h]")
    if b.step <= 0 or b.step % 32:
        raise RecipeError(f"{where}.buckets.step: SDXL needs a multiple of 32, got {b.step}")
    if not 0 < b.min_reso <= b.max_reso:
        raise RecipeError(f"{where}.buckets: need 0 < min_reso <= max_reso")
    d = recipe.dataset
    if not 0 <= d.caption_tag_dropout_rate < 1:
        raise RecipeError(f"{where}.dataset.caption_tag_dropout_rate: must lie in [0, 1)")
    if not d.shuffle_caption and d.caption_tag_dropout_rate == 0:
        # sd-scripts splits on keep_tokens_separator only when it shuffles or drops tags;
        # otherwise the literal separator would reach the text encoder
        raise RecipeError(
            f"{where}.dataset: with shuffle_caption = false and caption_tag_dropout_rate = 0 "
            f"sd-scripts leaves {c.keep_tokens_separator!r} in the caption text; enable one of them"
        )
    assert set(RATINGS) == {f.name for f in dataclasses.fields(RatingTags)}
