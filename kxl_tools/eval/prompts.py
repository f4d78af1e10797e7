"""The benchmark's prompt sets, written to an editable JSON-lines prompt file.

(a) characters: the N most frequent character tags among the posts of a kxl-prep output
    (default 3600, as on the card), each with its most frequent copyright and people-count
    tag, in the card's order `<people count>, <character>, <series>, <quality>, <year>,
    <rating>`. The prompt text is made by kxl_prep's own caption builder (same underscore and
    drop rules as the training captions), then written in sd-webui syntax (`\\(` `\\)` for
    literal parentheses, as the card asks), which sd-scripts' long-prompt pipeline parses.
(b) style: the style prompts the Epsilon card lists (artist combinations, verbatim), each
    as `1girl, <artists>, <quality>, <year>, <rating>`.

One JSON object per line: id, kind, prompt, seeds, and for characters: character (tag),
display (as in the captions), copyright, people, posts (how many selected posts carry it).
Seeds are fixed per prompt: derived from (base seed, the prompt's key), so they do not move
when N or the order changes.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kxl_common.atomic import atomic_open
from kxl_prep.captions import CaptionBuilder, TagSource
from kxl_prep.recipe import CaptionSpec, DataRecipe, recipe_from_dict
from kxl_prep.schema import RATINGS, TAG_COLUMNS

from .errors import EvalError

KINDS = ("character", "style", "custom")

# The "good style prompts" of the Kohaku XL Epsilon card (rev1 and rev2 cards list the same
# five), verbatim in sd-webui syntax. Source: the card as archived at
# https://civitaiarchive.com/models/399873?modelVersionId=445973 and the author's post
# http://kblueleaf.net/posts/kohaku-xl-epsilon/ (the second splits the second line in two;
# the civitai copy is followed here).
CARD_STYLE_PROMPTS = (
    r"ask \(askzy\), torino aqua, migolu, (jiu ye sang:1.1), (rumoon:0.9), (mizumi zumi:1.1)",
    r"ciloranko, maccha \(mochancc\), lobelia \(saclia\), migolu, ask \(askzy\), wanke, "
    r"(jiu ye sang:1.1), (rumoon:0.9), (mizumi zumi:1.1)",
    r"shiro9jira, ciloranko, ask \(askzy\), (tianliang duohe fangdongye:0.8)",
    r"(azuuru:1.1), (torino aqua:1.2), (azuuru:1.1), kedama milk, fuzichoco, ask \(askzy\), "
    r"chen bin, atdan, hito, mignon",
    r"ask \(askzy\), torino aqua, migolu",
)
STYLE_PEOPLE = "1girl"  # the card's style prompts come without a subject; kxl adds this one


@dataclass
class Prompt:
    id: str
    kind: str
    prompt: str
    seeds: list[int]
    character: str | None = None
    display: str | None = None
    copyright: str | None = None
    people: str | None = None
    posts: int | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class Suffix:
    """Which quality / year / rating tags the prompts end with (the card's best by default)."""
    quality: int = 0  # index into the recipe's quality labels (0: masterpiece)
    year: int = 2024  # a year: the recipe's year bins turn it into a tag (2024: newest)
    rating: str = "general"  # one of RATINGS (general: safe)


def webui_escape(text: str) -> str:
    """Literal parentheses as sd-webui / sd-scripts' prompt parser want them."""
    return text.replace("\\", "\\\\").replace("(", r"\(").replace(")", r"\)")


def webui_unescape(text: str) -> str:
    """The inverse of webui_escape (for pipelines that do not parse prompt weights)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def seeds_for(key: str, n: int, base_seed: int) -> list[int]:
    """n seeds fixed by (base_seed, key): crc32, so any Python and any order gives the same."""
    return [zlib.crc32(f"{base_seed}:{key}:{j}".encode("utf-8")) & 0x7FFFFFFF for j in range(n)]


# -- the dataset side ---------------------------------------------------------------------------

def recipe_of(dataset_dir: Path) -> DataRecipe:
    """The data recipe a kxl-prep output was made with (manifest.json's resolved copy)."""
    manifest = dataset_dir / "manifest.json"
    if not manifest.is_file():
        raise EvalError(f"{dataset_dir}: no manifest.json (not a finished kxl-prep output)")
    try:
        data = json.loads(manifest.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"{manifest}: not a kxl-prep manifest (not JSON: {exc})") from None
    try:
        return recipe_from_dict(data["recipe"]["resolved"], where=f"{manifest}: recipe.resolved")
    except KeyError as exc:
        raise EvalError(f"{manifest}: field recipe.resolved missing") from exc


def manifest_sources(dataset_dir: Path) -> list[Path]:
    data = json.loads((dataset_dir / "manifest.json").read_text(encoding="utf-8"))
    return [Path(i["path"]) for i in data.get("inputs", []) if i.get("path")]


def selected_ids(dataset_dir: Path) -> np.ndarray:
    path = dataset_dir / "selection.parquet"
    if not path.is_file():
        raise EvalError(f"{dataset_dir}: no selection.parquet")
    return pq.read_table(path, columns=["id"]).column("id").to_numpy()


def _pairs(col: pa.Array, name: str) -> pd.DataFrame:
    """(row, tag) for every element of a list<string> column."""
    rows = pc.list_parent_indices(col).to_numpy(zero_copy_only=False).astype(np.int64)
    tags = pc.list_flatten(col).cast(pa.string()).to_numpy(zero_copy_only=False)
    return pd.DataFrame({"row": rows, name: tags}).dropna().drop_duplicates()


def _mode_per(df: pd.DataFrame, key: str, value: str, rank: dict[str, int] | None = None) -> pd.Series:
    """The most frequent `value` per `key` (ties: the recipe's rank if given, else by name)."""
    if df.empty:
        return pd.Series(dtype=object)
    counts = df.groupby([key, value]).size().rename("n").reset_index()
    tie = counts[value].map(rank) if rank else counts[value]
    counts = counts.assign(_tie=tie).sort_values([key, "n", "_tie"], ascending=[True, False, True])
    return counts.drop_duplicates(key).set_index(key)[value]


def character_table(posts: pd.DataFrame | pa.Table, ids: np.ndarray, spec: CaptionSpec, n: int) -> pd.DataFrame:
    """The n most frequent character tags among the posts whose id is in `ids`: columns
    character, posts, copyright (most frequent; None if never), people (most frequent
    people-count tag; None if never). Ordered by posts (desc), then tag name."""
    post_ids = (posts.column("id").to_numpy() if isinstance(posts, pa.Table) else posts["id"].to_numpy())
    positions = pd.Index(post_ids).get_indexer(np.asarray(ids))
    missing = np.flatnonzero(positions < 0)
    if len(missing):
        raise EvalError(f"{len(missing)} selected post(s) not in the sources, e.g. id {int(ids[missing[0]])}: "
                        "pass the sources the dataset was prepared from (--source)")
    tags = TagSource(posts).take(positions.astype(np.int64))
    chars = _pairs(tags["tags_character"], "character")
    chars = chars[~chars["character"].isin(set(spec.drop_tags))]
    counts = chars["character"].value_counts()
    table = pd.DataFrame({"character": counts.index.astype(str), "posts": counts.to_numpy(dtype=np.int64)})
    table = table.sort_values(["posts", "character"], ascending=[False, True]).head(n).reset_index(drop=True)
    top = chars[chars["character"].isin(set(table["character"]))]
    copy = _pairs(tags["tags_copyright"], "copyright").merge(top, on="row")
    people = _pairs(tags["tags_general"], "people")
    people = people[people["people"].isin(set(spec.people_count_tags))].merge(top, on="row")
    rank = {t: i for i, t in enumerate(spec.people_count_tags)}
    table["copyright"] = table["character"].map(_mode_per(copy, "character", "copyright"))
    table["people"] = table["character"].map(_mode_per(people, "character", "people", rank))
    return table.astype(object).where(table.notna(), None)


# -- prompt text through the caption builder ----------------------------------------------------

def _lists(values: Sequence[Sequence[str]]) -> pa.Array:
    return pa.array([list(v) for v in values], type=pa.list_(pa.string()))


def _sections(caption: str, sep: str) -> list[str]:
    return [s.strip() for s in caption.split(sep)]


class PromptText:
    """Prompt strings made by kxl_prep's CaptionBuilder, so every rule of the training
    captions (underscores, drop_tags, separators, suffix labels) applies unchanged."""

    def __init__(self, recipe: DataRecipe, suffix: Suffix = Suffix()):
        if suffix.rating not in RATINGS:
            raise EvalError(f"rating {suffix.rating!r}: must be one of {RATINGS}")
        if not 0 <= suffix.quality < len(recipe.quality.labels):
            raise EvalError(f"quality level {suffix.quality}: the recipe has {len(recipe.quality.labels)} labels")
        self.recipe, self.suffix = recipe, suffix
        self.sep = recipe.captions.keep_tokens_separator

    def _captions(self, general, character, copyright) -> list[str]:
        n = len(character)
        builder = CaptionBuilder(self.recipe.captions, self.recipe.quality.labels)
        tags = {name: _lists([[]] * n) for name in TAG_COLUMNS}
        tags.update(tags_general=_lists(general), tags_character=_lists(character),
                    tags_copyright=_lists(copyright))
        caps = builder.build_chunk(
            tags,
            np.full(n, self.suffix.quality, dtype=np.int64),
            np.full(n, RATINGS.index(self.suffix.rating), dtype=np.int64),
            np.full(n, self.suffix.year, dtype=np.int64),
        )
        return caps.to_pylist()

    def suffix_text(self) -> str:
        return _sections(self._captions([[]], [[]], [[]])[0], self.sep)[2]

    def characters(self, table: pd.DataFrame) -> tuple[list[str], list[str]]:
        """(prompt, display name) per row of a character_table."""
        n = len(table)
        if n == 0:
            return [], []
        char = [[c] for c in table["character"]]
        display = [_sections(c, self.sep)[0] for c in self._captions([[]] * n, char, [[]] * n)]
        people = [[p] if p else [] for p in table["people"]]
        copy = [[c] if c else [] for c in table["copyright"]]
        prompts = []
        for cap in self._captions(people, char, copy):
            prefix, _middle, suffix = _sections(cap, self.sep)
            prompts.append(", ".join(webui_escape(t) for t in prefix.split(", ") if t) + ", " + suffix)
        return prompts, display


def character_prompts(table: pd.DataFrame, text: PromptText, *, seeds_per_prompt: int, base_seed: int) -> list[Prompt]:
    prompts, display = text.characters(table)
    out = []
    for i, (row, prompt, disp) in enumerate(zip(table.itertuples(index=False), prompts, display)):
        if not disp or text.sep in disp:
            continue  # the caption rules drop this tag: the model never saw it
        out.append(Prompt(
            id=f"char-{i + 1:05d}", kind="character", prompt=prompt,
            seeds=seeds_for(f"character:{row.character}", seeds_per_prompt, base_seed),
            character=row.character, display=disp, copyright=row.copyright, people=row.people,
            posts=int(row.posts),
        ))
    return out


def style_prompts(text: PromptText, *, seeds_per_prompt: int, base_seed: int,
                  styles: Iterable[str] = CARD_STYLE_PROMPTS) -> list[Prompt]:
    suffix = text.suffix_text()
    return [
        Prompt(id=f"style-{i + 1:02d}", kind="style", prompt=f"{STYLE_PEOPLE}, {style}, {suffix}",
               seeds=seeds_for(f"style:{style}", seeds_per_prompt, base_seed))
        for i, style in enumerate(styles)
    ]


# -- the prompt file ----------------------------------------------------------------------------

def write_prompt_file(path: Path, prompts: Sequence[Prompt]) -> None:
    if not prompts:
        raise EvalError("no prompts to write")
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as fh:
        for p in prompts:
            fh.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")


_KNOWN = {"id", "kind", "prompt", "seeds", "character", "display", "copyright", "people", "posts"}


def read_prompt_file(path: Path) -> list[Prompt]:
    """Read and check a prompt file; errors name the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such prompt file")
    out, seen = [], {}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not a prompt file (not UTF-8 text: byte {exc.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict):
            raise EvalError(f"{where}: a prompt must be a JSON object")
        for key, typ in (("id", str), ("prompt", str), ("seeds", list)):
            if not isinstance(rec.get(key), typ):
                raise EvalError(f"{where}: field {key!r} missing or not a {typ.__name__}")
        pid = rec["id"]
        if not pid or "/" in pid or pid.startswith("."):
            raise EvalError(f"{where}: field 'id' {pid!r} is not usable as a folder name")
        if pid in seen:
            raise EvalError(f"{where}: field 'id' {pid!r} repeats line {seen[pid]}")
        seen[pid] = lineno
        seeds = rec["seeds"]
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seeds):
            raise EvalError(f"{where}: field 'seeds' must be a non-empty list of integers >= 0")
        if len(set(seeds)) != len(seeds):
            raise EvalError(f"{where}: field 'seeds' repeats a seed")
        kind = rec.get("kind", "custom")
        if kind not in KINDS:
            raise EvalError(f"{where}: field 'kind' {kind!r} must be one of {KINDS}")
        if kind == "character" and not isinstance(rec.get("display"), str):
            raise EvalError(f"{where}: field 'display' (the character as the captions write it) missing")
        out.append(Prompt(
            id=pid, kind=kind, prompt=rec["prompt"], seeds=list(seeds),
            character=rec.get("character"), display=rec.get("display"), copyright=rec.get("copyright"),
            people=rec.get("people"), posts=rec.get("posts"),
            extra={k: v for k, v in rec.items() if k not in _KNOWN},
        ))
    if not out:
        raise EvalError(f"{path}: holds no prompts")
    return out


def build_prompt_set(dataset_dir: Path, sources: Sequence[Path] | None = None, *, n_characters: int = 3600,
                     seeds_per_prompt: int = 1, base_seed: int = 0, styles: bool = True,
                     suffix: Suffix = Suffix(), progress: bool = True) -> tuple[list[Prompt], dict]:
    """Both prompt sets for one kxl-prep output. sources: the post sources it was prepared
    from (default: the manifest's inputs). Returns (prompts, summary)."""
    from kxl_prep.reject_summary import check_sources
    from kxl_prep.sources import read_posts

    dataset_dir = Path(dataset_dir)
    recipe = recipe_of(dataset_dir)
    if n_characters < 0 or seeds_per_prompt < 1:
        raise EvalError("need n_characters >= 0 and seeds_per_prompt >= 1")
    text = PromptText(recipe, suffix)
    prompts: list[Prompt] = []
    table = pd.DataFrame(columns=["character", "posts", "copyright", "people"])
    if n_characters:
        sources = list(sources) if sources else manifest_sources(dataset_dir)
        if not sources:
            raise EvalError(f"{dataset_dir}: the manifest names no sources; pass them with --source")
        for s in sources:
            if not Path(s).exists():
                raise EvalError(f"source {s}: not found (pass the sources with --source)")
        read = read_posts(sources, progress=progress)
        unusable, _ = check_sources(read.stats, read.rejects, warn_share=1.0)  # no post from a source: as prepare
        if unusable:
            raise EvalError("\n".join(unusable))
        posts = read.posts
        table = character_table(posts, selected_ids(dataset_dir), recipe.captions, n_characters)
        prompts += character_prompts(table, text, seeds_per_prompt=seeds_per_prompt, base_seed=base_seed)
    if styles:
        prompts += style_prompts(text, seeds_per_prompt=seeds_per_prompt, base_seed=base_seed)
    n_chars = sum(p.kind == "character" for p in prompts)
    summary = {
        "dataset": str(dataset_dir), "characters_asked": n_characters, "characters": n_chars,
        "characters_dropped_by_caption_rules": len(table) - n_chars, "styles": sum(p.kind == "style" for p in prompts),
        "seeds_per_prompt": seeds_per_prompt, "base_seed": base_seed,
    }
    return prompts, summary
