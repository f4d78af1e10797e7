"""A synthetic danbooru2023-shaped sample, generated here (no download).

`make_sample` writes a small, fully deterministic sample for demos and tests:
  <out>/danbooru2023.db      HakuBooru's SQLite schema (the peewee models of hakubooru 0.0.3)
  <out>/posts.jsonl          the same posts as Danbooru API records (plus a few broken lines)
  <out>/images/original/data-0000.tar .. data-0999.tar    id < 7,145,700: tar id % 1000
  <out>/images/updates/20240319/dataset-0.tar .. -9.tar    ids 7,145,700 .. 7,349,999: tar id % 10
  <out>/images/updates/20240522/dataset-0.tar .. -9.tar    ids 7,350,000 .. 7,599,999: tar id % 10
  <out>/images/recent/data-1000.tar .. data-1999.tar       ids from 7,600,000: tar 1000 + id % 1000
the file names nyanko7/danbooru2023 uses. Members sit at the tar root as `<id>.<ext>`; the
update tars name them `./<id>.<ext>` (both spellings occur in the wild). Which id range the
recent/ tars cover is this sample's assumption (the dataset pages do not say); readers must
not rely on it (the export indexes every tar it finds).

Images are tiny (longest side 32..96 px, the post's aspect ratio kept) while the DB keeps the
post's "original" width/height: whoever needs the real pixel size must read it from the file.
Posts whose file is a video or an archive (mp4, webm, zip, swf), a few deleted posts and
about 1% chosen at random have no file in the shards, as in the real dataset.

`write_tar(path, members)` and `member_name(id, ext, style)` (flat `<id>.<ext>`, dot
`./<id>.<ext>`, bucket `<id % 1000>/<id>.<ext>`) are the one tar writer and member naming of
kxl_testing: the sample's shards and the export's hand-made tars use them.

`make_bench_db` writes a large DB (millions of posts, ~30 tags each) for bench/bench_prep.py,
with bulk inserts and no images.

Tags can be stored two ways, both seen in danbooru2023 SQLite files:
  "relation": the `posttagrelation` table (post_id, tag_id), hakubooru 0.0.3's models;
  "text":     `tag_list` (+ `tag_list_<category>`) TEXT columns on the post row holding
              `$<id in base 36>#$<id in base 36>#...` (HakuBooru's later TagListField form),
              with `tag_count*` columns, and no posttagrelation table.

Same seed, same arguments -> byte-identical DB, JSONL and tar files.
"""
from __future__ import annotations

import io
import json
import sqlite3
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kxl_prep.schema import TAG_CATEGORIES

TAG_TYPES = TAG_CATEGORIES  # in HakuBooru's numbering 0..4
RATING_LETTERS = ("g", "s", "q", "e")
MAX_POST_ID = 7_900_000  # ids are drawn from [1, MAX_POST_ID): every rev1 id range is hit
# where the sample puts a post's file, by id (see the module docstring)
UPDATES = (("20240319", 7_145_700), ("20240522", 7_350_000))  # (folder, first id)
RECENT_FROM_ID = 7_600_000  # the newest ids live in recent/ shards
FIXED_MTIME = 1_700_000_000  # tar member mtime (deterministic archives)

# The DDL hakubooru 0.0.3's peewee models create (Post, Tag, PostTagRelation, LocalPost).
POST_COLUMNS_DDL = (
    '"id" INTEGER NOT NULL PRIMARY KEY, "created_at" VARCHAR(255) NOT NULL, '
    '"uploader_id" INTEGER NOT NULL, "source" VARCHAR(255) NOT NULL, "md5" VARCHAR(255), '
    '"parent_id" INTEGER, "has_children" INTEGER NOT NULL, "is_deleted" INTEGER NOT NULL, '
    '"is_banned" INTEGER NOT NULL, "pixiv_id" INTEGER, "has_active_children" INTEGER NOT NULL, '
    '"bit_flags" INTEGER NOT NULL, "has_large" INTEGER NOT NULL, '
    '"has_visible_children" INTEGER NOT NULL, "image_width" INTEGER NOT NULL, '
    '"image_height" INTEGER NOT NULL, "file_size" INTEGER NOT NULL, '
    '"file_ext" VARCHAR(255) NOT NULL, "rating" INTEGER NOT NULL, "score" INTEGER NOT NULL, '
    '"up_score" INTEGER NOT NULL, "down_score" INTEGER NOT NULL, "fav_count" INTEGER NOT NULL, '
    '"file_url" VARCHAR(255), "large_file_url" VARCHAR(255), "preview_file_url" VARCHAR(255), '
    '"updated_at" VARCHAR(255) NOT NULL'
)
POST_FIELDS = (
    "id", "created_at", "uploader_id", "source", "md5", "parent_id", "has_children",
    "is_deleted", "is_banned", "pixiv_id", "has_active_children", "bit_flags", "has_large",
    "has_visible_children", "image_width", "image_height", "file_size", "file_ext", "rating",
    "score", "up_score", "down_score", "fav_count", "file_url", "large_file_url",
    "preview_file_url", "updated_at",
)
TEXT_TAG_COLUMNS = ("tag_list",) + tuple(f"tag_list_{t}" for t in TAG_TYPES)
TEXT_COUNT_COLUMNS = ("tag_count",) + tuple(f"tag_count_{t}" for t in TAG_TYPES)
TAG_DDL = (
    'CREATE TABLE "tag" ("id" INTEGER NOT NULL PRIMARY KEY, "name" VARCHAR(255) NOT NULL, '
    '"type" INTEGER NOT NULL, "popularity" INTEGER NOT NULL)'
)
INDEX_DDL = (
    'CREATE UNIQUE INDEX "tag_name" ON "tag" ("name")',
    'CREATE INDEX "posttagrelation_post_id" ON "posttagrelation" ("post_id")',
    'CREATE INDEX "posttagrelation_tag_id" ON "posttagrelation" ("tag_id")',
    'CREATE INDEX "localpost_post_id" ON "localpost" ("post_id")',
)
RELATION_DDL = (
    'CREATE TABLE "posttagrelation" ("id" INTEGER NOT NULL PRIMARY KEY, '
    '"post_id" INTEGER NOT NULL, "tag_id" INTEGER NOT NULL, '
    'FOREIGN KEY ("post_id") REFERENCES "post" ("id"), '
    'FOREIGN KEY ("tag_id") REFERENCES "tag" ("id"))'
)
LOCALPOST_DDL = (
    'CREATE TABLE "localpost" ("id" INTEGER NOT NULL PRIMARY KEY, "filepath" VARCHAR(255), '
    '"latentpath" VARCHAR(255), "post_id" INTEGER NOT NULL, '
    'FOREIGN KEY ("post_id") REFERENCES "post" ("id"))'
)

# --- vocabulary ------------------------------------------------------------------------------
PEOPLE_TAGS = (  # (name, weight); HakuBooru's "special" people-count tags
    ("1girl", 0.48), ("2girls", 0.07), ("3girls", 0.02), ("4girls", 0.006), ("5girls", 0.003),
    ("6+girls", 0.005), ("1boy", 0.12), ("2boys", 0.02), ("3boys", 0.005), ("6+boys", 0.002),
    ("1other", 0.01), ("2others", 0.002), ("no_humans", 0.06),
)
COMMON_GENERAL = (
    "long_hair", "looking_at_viewer", "blush", "smile", "short_hair", "open_mouth",
    "bangs", "blue_eyes", "simple_background", "skirt", "shirt", "brown_hair", "black_hair",
    "thighhighs", "hat", "long_sleeves", "red_eyes", "white_background", "dress", "ribbon",
    "holding", "gloves", "bow", "twintails", "school_uniform", "jewelry", "closed_eyes",
    "hair_ornament", "navel", "animal_ears", "sitting", "standing", "full_body", "upper_body",
    "outdoors", "sky", "day", "cloud", "tree", "flower", "food", "weapon", "sword", "water",
    "indoors", "smile", "multiple_views", "male_focus", "monochrome", "greyscale", "comic",
)
EMOTICONS = ("^_^", "o_o", ">_<", ":d", ":3", "x_x", "0_0", ";d", "^^^", "+_+", ":o", "=_=")
META_TAGS = (  # (name, probability per post)
    ("highres", 0.55), ("absurdres", 0.15), ("commentary_request", 0.3), ("translated", 0.05),
    ("bad_id", 0.06), ("bad_pixiv_id", 0.05), ("commentary", 0.08),
    ("english_commentary", 0.05), ("translation_request", 0.03), ("lowres", 0.03),
    ("official_art", 0.03), ("photoshop_(medium)", 0.02), ("tagme", 0.01), ("revision", 0.01),
    ("md5_mismatch", 0.005), ("animated", 0.01), ("video", 0.005), ("jpeg_artifacts", 0.01),
    ("third-party_edit", 0.005), ("check_translation", 0.005),
)
BANNED_ARTIST = "banned_artist"
_ADJ = (
    "red", "blue", "green", "black", "white", "pink", "purple", "yellow", "orange", "grey",
    "brown", "aqua", "long", "short", "open", "striped", "checkered", "frilled", "torn", "wet",
    "floating", "holding", "crossed", "bare", "sleeveless", "hooded", "wide", "side", "single",
    "hair",
)
_NOUN = (
    "hair", "eyes", "ribbon", "bow", "skirt", "dress", "shirt", "jacket", "gloves", "hat",
    "thighhighs", "boots", "scarf", "sleeves", "collar", "necktie", "cape", "apron", "belt",
    "umbrella", "flower", "background", "sky", "legs", "arms", "shoulders", "mouth", "hands",
    "wings", "tail", "ears", "horns", "halo", "sword", "gun", "book", "cup", "bag", "bench",
    "window", "bed", "chair", "table", "tree", "moon", "star", "sun", "cloud", "rain", "snow",
)
_SYL = (
    "ka", "ko", "ha", "ku", "mi", "na", "ri", "to", "sa", "yu", "ma", "shi", "ra", "no", "ta",
    "ki", "re", "hi", "mo", "ne", "su", "zu", "ya", "ro", "te", "wa", "chi", "fu", "ke", "se",
    "so", "me", "ru", "yo", "ni", "ho", "ai", "ei", "ou", "ji",
)


def _syllable_name(i: int, n_syl: int) -> str:
    # an odd multiplier coprime to 40 scrambles i without collisions below 40**n_syl
    i = (i * 2654435761 + 12345) % len(_SYL) ** n_syl
    parts = []
    for _ in range(n_syl):
        parts.append(_SYL[i % len(_SYL)])
        i //= len(_SYL)
    return "".join(parts)


@dataclass
class Vocabulary:
    """Tag names and types; ids are positions (tag id = index + 1 in the DB)."""

    names: list[str]
    types: np.ndarray  # int8, HakuBooru type per tag
    people: np.ndarray  # tag indices of PEOPLE_TAGS, same order
    people_p: np.ndarray
    general: np.ndarray  # popularity order (rank 0 = most popular)
    artists: np.ndarray
    banned_artist: int
    characters: np.ndarray
    character_series: np.ndarray  # copyright tag index per character
    copyrights: np.ndarray
    meta: np.ndarray
    meta_p: np.ndarray
    solo: int
    multiple_girls: int
    multiple_boys: int


def make_vocabulary(n_general: int, n_artists: int, n_characters: int, n_copyrights: int,
                    rng: np.random.Generator) -> Vocabulary:
    names: list[str] = []
    types: list[int] = []
    seen: set[str] = set()

    def add(name: str, type_: int) -> int:
        if name in seen:
            return -1
        seen.add(name)
        names.append(name)
        types.append(type_)
        return len(names) - 1

    people = [add(n, 0) for n, _ in PEOPLE_TAGS]
    people_p = np.array([w for _, w in PEOPLE_TAGS])
    multiple_girls, multiple_boys = add("multiple_girls", 0), add("multiple_boys", 0)
    solo = add("solo", 0)  # given to single-person posts only, never drawn at random
    general = [i for i in (add(n, 0) for n in COMMON_GENERAL) if i >= 0]
    combos = [f"{a}_{b}" for a in _ADJ for b in _NOUN if a != b]
    emoticon_ranks = {40 + 25 * k: e for k, e in enumerate(EMOTICONS)}  # mid popularity
    k = 0
    while len(general) < n_general:
        rank = len(general)
        if rank in emoticon_ranks:
            general.append(add(emoticon_ranks[rank], 0))
            continue
        name = combos[k % len(combos)] + ("" if k < len(combos) else f"_{k // len(combos)}")
        k += 1
        idx = add(name, 0)
        if idx >= 0:
            general.append(idx)
    copyrights = [add(f"{_syllable_name(i, 3)}_{'no' if i % 3 else 'the'}_{_syllable_name(i * 7 + 1, 2)}", 3)
                  for i in range(n_copyrights)]
    characters, character_series = [], []
    series_pick = rng.zipf(1.6, size=n_characters) - 1
    for i in range(n_characters):
        s = int(series_pick[i]) % n_copyrights
        series_name = names[copyrights[s]]
        idx = add(f"{_syllable_name(i * 13 + 5, 2)}_{_syllable_name(i, 3)}_({series_name})", 2)
        characters.append(idx)
        character_series.append(copyrights[s])
    banned = add(BANNED_ARTIST, 1)
    artists = [add(f"{_syllable_name(i, 4)}_{i % 97}", 1) for i in range(n_artists)]
    meta = [add(n, 4) for n, _ in META_TAGS]
    meta_p = np.array([p for _, p in META_TAGS])
    return Vocabulary(
        names=names, types=np.array(types, dtype=np.int8), people=np.array(people),
        people_p=people_p / people_p.sum(), general=np.array(general),
        artists=np.array(artists), banned_artist=banned, characters=np.array(characters),
        character_series=np.array(character_series), copyrights=np.array(copyrights),
        meta=np.array(meta), meta_p=meta_p, solo=solo, multiple_girls=multiple_girls,
        multiple_boys=multiple_boys,
    )


def _zipf_pick(rng: np.random.Generator, pool: np.ndarray, size: int, a: float = 1.05) -> np.ndarray:
    """Draw from `pool` (ordered most popular first) with Zipf-like weights 1/rank^a."""
    w = 1.0 / np.arange(1, len(pool) + 1) ** a
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return pool[np.minimum(np.searchsorted(cdf, rng.random(size)), len(pool) - 1)]


def draw_post_tags(rng: np.random.Generator, vocab: Vocabulary, n: int,
                   mean_general: float = 28.0) -> tuple[np.ndarray, np.ndarray]:
    """Tags of n posts as (post index, tag index) pairs, unique, sorted by post."""
    parts_post, parts_tag = [], []

    def put(posts: np.ndarray, tags: np.ndarray) -> None:
        parts_post.append(posts.astype(np.int64))
        parts_tag.append(tags.astype(np.int64))

    idx = np.arange(n)
    people = vocab.people[rng.choice(len(vocab.people), size=n, p=vocab.people_p)]
    has_people = rng.random(n) < 0.93
    put(idx[has_people], people[has_people])
    girls_many = np.isin(people, [vocab.people[i] for i, (nm, _) in enumerate(PEOPLE_TAGS)
                                  if nm.endswith("girls")])
    boys_many = np.isin(people, [vocab.people[i] for i, (nm, _) in enumerate(PEOPLE_TAGS)
                                 if nm.endswith("boys")])
    put(idx[has_people & girls_many], np.full((has_people & girls_many).sum(), vocab.multiple_girls))
    put(idx[has_people & boys_many], np.full((has_people & boys_many).sum(), vocab.multiple_boys))
    single = has_people & np.isin(people, [vocab.people[i] for i, (nm, _) in enumerate(PEOPLE_TAGS)
                                          if nm[0] == "1"])
    solo_mask = single & (rng.random(n) < 0.8)
    put(idx[solo_mask], np.full(solo_mask.sum(), vocab.solo))

    n_char = rng.choice(4, size=n, p=[0.3, 0.5, 0.15, 0.05])
    char_posts = np.repeat(idx, n_char)
    chars = _zipf_pick(rng, vocab.characters, len(char_posts), a=0.9)
    put(char_posts, chars)
    series_of = np.full(len(vocab.names), -1, dtype=np.int64)
    series_of[vocab.characters] = vocab.character_series
    put(char_posts, series_of[chars])
    extra_cr = rng.random(n) < 0.15
    put(idx[extra_cr], _zipf_pick(rng, vocab.copyrights, int(extra_cr.sum()), a=1.0))

    n_art = rng.choice(3, size=n, p=[0.08, 0.89, 0.03])
    art_posts = np.repeat(idx, n_art)
    arts = _zipf_pick(rng, vocab.artists, len(art_posts), a=0.8)
    banned = rng.random(len(arts)) < 0.005
    arts[banned] = vocab.banned_artist
    put(art_posts, arts)

    meta_hit = rng.random((n, len(vocab.meta))) < vocab.meta_p
    mp, mt = np.nonzero(meta_hit)
    put(mp, vocab.meta[mt])

    n_gen = np.maximum(rng.poisson(mean_general, size=n), 2)
    gen_posts = np.repeat(idx, n_gen)
    put(gen_posts, _zipf_pick(rng, vocab.general, len(gen_posts), a=1.0))

    posts = np.concatenate(parts_post)
    tags = np.concatenate(parts_tag)
    key = np.unique(posts * len(vocab.names) + tags)
    return key // len(vocab.names), key % len(vocab.names)


# --- posts -----------------------------------------------------------------------------------
_EXTS = np.array(["jpg", "png", "webp", "gif", "mp4", "zip", "webm", "swf"])
_EXT_P = np.array([0.70, 0.215, 0.02, 0.025, 0.02, 0.01, 0.007, 0.003])
_ASPECTS = np.array([(1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (16, 9), (9, 16), (1, 2), (2, 1),
                     (1, 4), (5, 1), (1, 8), (21, 9), (7, 10)], dtype=np.float64)
_ASPECT_P = np.array([0.12, 0.25, 0.12, 0.15, 0.06, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0.01,
                      0.02, 0.02])
_FAV_MU = np.array([1.9, 2.6, 3.4, 3.6])  # log-normal location per rating (g, s, q, e)
_OTHER_OFFSETS = np.array(["+09:00", "+00:00", "+08:00", "-07:00", "+05:30", "-03:00"])
_START = np.datetime64("2005-05-24T00:00:00", "ms")
_END = np.datetime64("2024-05-01T00:00:00", "ms")


def draw_ids(rng: np.random.Generator, n: int, max_id: int = MAX_POST_ID) -> np.ndarray:
    """n distinct sorted post ids in [1, max_id)."""
    return np.sort(rng.choice(np.arange(1, max_id), size=n, replace=False))


def draw_posts(rng: np.random.Generator, n: int, max_id: int = MAX_POST_ID,
               ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Scalar fields of n posts (HakuBooru column names; rating as 0..3)."""
    if ids is None:
        ids = draw_ids(rng, n, max_id)
    n = len(ids)
    frac = ids / max_id
    span = (_END - _START).astype(np.int64)
    ms = (frac ** 0.85 * span).astype(np.int64) + rng.integers(-3_600_000 * 24, 3_600_000 * 24, n)
    local = _START + np.clip(ms, 0, span).astype("timedelta64[ms]")
    text = np.datetime_as_string(local, unit="ms")
    month = (local.astype("datetime64[M]").astype(np.int64) % 12) + 1
    offsets = np.where((month >= 4) & (month <= 10), "-04:00", "-05:00")
    other = rng.random(n) < 0.03
    offsets[other] = rng.choice(_OTHER_OFFSETS, size=int(other.sum()))
    created = np.char.add(text.astype("U23"), offsets)

    rating = rng.choice(4, size=n, p=[0.36, 0.30, 0.14, 0.20])
    fav = np.expm1(rng.normal(_FAV_MU[rating] + 1.2 * frac, 1.25)).astype(np.int64)
    fav = np.maximum(fav, 0)
    score = (fav * rng.uniform(0.6, 1.1, n)).astype(np.int64) + rng.integers(-3, 4, n)
    up = np.maximum(score, 0) + rng.integers(0, 3, n)
    down = score - up

    aspect = _ASPECTS[rng.choice(len(_ASPECTS), size=n, p=_ASPECT_P)]
    long_side = np.clip(np.exp(rng.normal(7.4, 0.45, n)), 300, 12000)
    scale = long_side / aspect.max(axis=1)
    width = np.maximum((aspect[:, 0] * scale).astype(np.int64), 1)
    height = np.maximum((aspect[:, 1] * scale).astype(np.int64), 1)
    ext = _EXTS[rng.choice(len(_EXTS), size=n, p=_EXT_P)]
    file_size = (width * height * rng.uniform(0.3, 1.6, n)).astype(np.int64) + 1000

    is_deleted = rng.random(n) < 0.045
    is_banned = rng.random(n) < 0.006
    restricted = rng.random(n) < 0.012
    md5 = np.array([bytes(b).hex() for b in rng.integers(0, 256, (n, 16), dtype=np.uint8)], dtype=object)
    url = np.array([f"https://cdn.donmai.us/original/{m[:2]}/{m[2:4]}/{m}.{e}"
                    for m, e in zip(md5.tolist(), ext.tolist())], dtype=object)
    md5[restricted] = None
    url[restricted] = None
    return {
        "id": ids, "created_at": created.astype(object), "rating": rating, "fav_count": fav,
        "score": score, "up_score": up, "down_score": down, "image_width": width,
        "image_height": height, "file_ext": ext.astype(object), "file_size": file_size,
        "md5": md5, "file_url": url, "is_deleted": is_deleted, "is_banned": is_banned,
        "uploader_id": rng.integers(1, 900_000, n),
    }


def _post_rows(p: dict[str, np.ndarray], lo: int, hi: int, extra: list | None = None):
    """Rows for the post table in POST_FIELDS order (plus `extra` columns per row)."""
    ids = p["id"][lo:hi].tolist()
    created = p["created_at"][lo:hi].tolist()
    md5 = p["md5"][lo:hi].tolist()
    url = p["file_url"][lo:hi].tolist()
    cols = [p[k][lo:hi].tolist() for k in (
        "uploader_id", "is_deleted", "is_banned", "image_width", "image_height", "file_size",
        "file_ext", "rating", "score", "up_score", "down_score", "fav_count")]
    for j in range(hi - lo):
        (uploader, deleted, banned, w, h, size, ext, rating, score, up, down, fav) = (c[j] for c in cols)
        row = (ids[j], created[j], uploader, "", md5[j], None, 0, int(deleted), int(banned), None,
               0, 0, 0, 0, w, h, size, ext, rating, score, up, down, fav, url[j],
               url[j], url[j], created[j])
        yield row + tuple(extra[j]) if extra is not None else row


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def encode_tag_list(tag_ids) -> str:
    """HakuBooru's TagListField text: `$<base36 id>#` per tag."""
    return "".join(f"${_base36(int(t))}#" for t in tag_ids)


def _create_schema(con: sqlite3.Connection, tag_storage: str, with_indexes: bool) -> None:
    extra = ""
    if tag_storage == "text":
        extra = "".join(f', "{c}" TEXT' for c in TEXT_TAG_COLUMNS) + "".join(
            f', "{c}" INTEGER' for c in TEXT_COUNT_COLUMNS)
    con.execute(f'CREATE TABLE "post" ({POST_COLUMNS_DDL}{extra})')
    con.execute(TAG_DDL)
    if tag_storage == "relation":
        con.execute(RELATION_DDL)
    con.execute(LOCALPOST_DDL)
    if with_indexes:
        _create_indexes(con, tag_storage)


def _create_indexes(con: sqlite3.Connection, tag_storage: str, skip: tuple[str, ...] = ()) -> None:
    """The schema's indexes that do not exist yet (less those named in skip)."""
    existing = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    for ddl in INDEX_DDL:
        name = ddl.split('"')[1]
        if tag_storage != "relation" and "posttagrelation" in ddl:
            continue
        if name not in existing and name not in skip:
            con.execute(ddl)


def _check_storage(tag_storage: str) -> None:
    if tag_storage not in ("relation", "text"):
        raise ValueError(f"tag_storage must be 'relation' or 'text', not {tag_storage!r}")


def _write_db(path: Path, vocab: Vocabulary, chunks, tag_storage: str, n_total: int,
              progress: bool = False, tag_id_index: bool = True) -> None:
    """chunks yields (posts dict, post_idx, tag_idx) with post_idx local to the chunk."""
    from tqdm import tqdm

    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-200000")
    _create_schema(con, tag_storage, with_indexes=False)
    if tag_storage == "relation":
        # relation rows arrive in post id order: this index grows by appends, cheaper than
        # sorting hundreds of millions of rows afterwards
        con.execute(INDEX_DDL[1])
    popularity = np.zeros(len(vocab.names), dtype=np.int64)
    rel_id = 1
    placeholders = ",".join("?" * len(POST_FIELDS))
    n_types = len(TAG_TYPES)
    bar = tqdm(total=n_total, desc="writing posts", unit="post", disable=not progress)
    for posts, post_idx, tag_idx, order_rng in chunks:
        n = len(posts["id"])
        np.add.at(popularity, tag_idx, 1)
        db_tag = tag_idx + 1
        if tag_storage == "relation":
            con.executemany(f'INSERT INTO "post" VALUES ({placeholders})', _post_rows(posts, 0, n))
            # relation rows in a scrambled order within each post (readers must not rely on it)
            perm = np.lexsort((order_rng.random(len(post_idx)), post_idx))
            pid = posts["id"][post_idx[perm]]
            rows = zip(range(rel_id, rel_id + len(perm)), pid.tolist(), db_tag[perm].tolist())
            con.executemany('INSERT INTO "posttagrelation" VALUES (?,?,?)', rows)
            rel_id += len(perm)
        else:
            perm = np.lexsort((order_rng.random(len(post_idx)), post_idx))
            bounds = np.searchsorted(post_idx[perm], np.arange(n + 1))
            tag_sorted = db_tag[perm].tolist()
            type_sorted = vocab.types[tag_idx[perm]].tolist()
            extra = []
            for j in range(n):
                ids_j = tag_sorted[bounds[j]:bounds[j + 1]]
                types_j = type_sorted[bounds[j]:bounds[j + 1]]
                per_type = [[t for t, ty in zip(ids_j, types_j) if ty == k] for k in range(n_types)]
                extra.append([encode_tag_list(ids_j)] + [encode_tag_list(x) for x in per_type]
                             + [len(ids_j)] + [len(x) for x in per_type])
            ph = ",".join("?" * (len(POST_FIELDS) + 2 * (n_types + 1)))
            con.executemany(f'INSERT INTO "post" VALUES ({ph})', _post_rows(posts, 0, n, extra))
        bar.update(n)
    bar.close()
    con.executemany('INSERT INTO "tag" VALUES (?,?,?,?)',
                    zip(range(1, len(vocab.names) + 1), vocab.names, vocab.types.tolist(),
                        popularity.tolist()))
    _create_indexes(con, tag_storage, skip=() if tag_id_index else ("posttagrelation_tag_id",))
    con.commit()
    con.close()


# --- malformed rows (sample only) -----------------------------------------------------------
MALFORMED = {  # field -> (SQL SET clause, expected reject field)
    "rating": ('"rating" = 7', "rating"),
    "created_at": ('"created_at" = \'yesterday\'', "created_at"),
    "image_width": ('"image_width" = -640', "image_width"),
    "file_size": ('"file_size" = \'12kb\'', "file_size"),
    "fav_count": ('"fav_count" = -3', "fav_count"),
}


@dataclass(frozen=True)
class SamplePaths:
    root: Path
    db: Path
    shards: Path  # holds original/, recent/, updates/
    jsonl: Path
    malformed: dict = field(default_factory=dict)  # post id -> field its reject names
    tag_storage: str = "relation"


def _image_bytes(post_id: int, w: int, h: int, ext: str, rng: np.random.Generator) -> bytes:
    from PIL import Image

    side = int(rng.integers(32, 97))
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.array([post_id % 251, (post_id // 251) % 251, (post_id * 7) % 251], dtype=np.int64)
    pixels = ((xx[..., None] * 5 + yy[..., None] * 3 + base) % 256).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, format="JPEG", quality=85)
    elif ext == "png":
        img.save(buf, format="PNG")
    elif ext == "webp":
        img.save(buf, format="WEBP", lossless=True)
    elif ext == "gif":
        img.convert("P").save(buf, format="GIF")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar of (member name, bytes), members in the order given, fixed mtime."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)  # mode 0o644, no owner names: the defaults
            info.size = len(data)
            info.mtime = FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    return path


def shard_of(post_id: int) -> str:
    """Shard path (relative to the images root) the sample writes a post to."""
    if post_id >= RECENT_FROM_ID:
        return f"recent/data-{1000 + post_id % 1000:04d}.tar"
    for folder, first in reversed(UPDATES):
        if post_id >= first:
            return f"updates/{folder}/dataset-{post_id % 10}.tar"
    return f"original/data-{post_id % 1000:04d}.tar"


MEMBER_STYLES = ("flat", "dot", "bucket")


def member_name(post_id: int, ext: str, style: str = "flat") -> str:
    """flat `<id>.<ext>` (nyanko7/danbooru2023's tars), dot `./<id>.<ext>` (its update tars),
    bucket `<id % 1000 as 4 digits>/<id>.<ext>` (the form of the directory tree)."""
    if style not in MEMBER_STYLES:
        raise ValueError(f"member style {style!r}: expected one of {MEMBER_STYLES}")
    prefix = {"flat": "", "dot": "./", "bucket": f"{post_id % 1000:04d}/"}[style]
    return f"{prefix}{post_id}.{ext}"


def sample_member_name(post_id: int, ext: str) -> str:
    """The member name the sample gives a post: `./<id>.<ext>` in the update tars, else `<id>.<ext>`."""
    return member_name(post_id, ext, "dot" if shard_of(post_id).startswith("updates/") else "flat")


STILL_OR_GIF = ("jpg", "png", "webp", "gif")


def _write_shards(root: Path, posts: dict, rng: np.random.Generator) -> None:
    shards: dict[str, list[tuple[str, bytes]]] = {f"original/data-{b:04d}.tar": [] for b in range(1000)}
    n = len(posts["id"])
    missing = rng.random(n) < 0.01
    keep_deleted = rng.random(n) < 0.5
    for j in range(n):
        pid = int(posts["id"][j])
        ext = posts["file_ext"][j]
        if (ext not in STILL_OR_GIF or posts["md5"][j] is None or missing[j]
                or (posts["is_deleted"][j] and not keep_deleted[j])):
            continue
        w, h = int(posts["image_width"][j]), int(posts["image_height"][j])
        data = _image_bytes(pid, max(w, 1), max(h, 1), ext, rng)
        shards.setdefault(shard_of(pid), []).append((sample_member_name(pid, ext), data))
    for rel, members in sorted(shards.items()):
        write_tar(root / rel, sorted(members))


def _jsonl_record(posts: dict, j: int, vocab: Vocabulary, tags_by_type: list[list[str]]) -> dict:
    md5 = posts["md5"][j]
    url = posts["file_url"][j]
    rec = {
        "id": int(posts["id"][j]),
        "created_at": posts["created_at"][j],
        "uploader_id": int(posts["uploader_id"][j]),
        "score": int(posts["score"][j]),
        "source": "",
        "rating": RATING_LETTERS[int(posts["rating"][j])],
        "image_width": int(posts["image_width"][j]),
        "image_height": int(posts["image_height"][j]),
        "tag_string": " ".join(sorted(t for ts in tags_by_type for t in ts)),
        "fav_count": int(posts["fav_count"][j]),
        "file_ext": posts["file_ext"][j],
        "tag_string_general": " ".join(tags_by_type[0]),
        "tag_string_character": " ".join(tags_by_type[2]),
        "tag_string_copyright": " ".join(tags_by_type[3]),
        "tag_string_artist": " ".join(tags_by_type[1]),
        "tag_string_meta": " ".join(tags_by_type[4]),
        "file_size": int(posts["file_size"][j]),
        "is_pending": False,
        "is_flagged": False,
        "is_deleted": bool(posts["is_deleted"][j]),
        "is_banned": bool(posts["is_banned"][j]),
        "up_score": int(posts["up_score"][j]),
        "down_score": int(posts["down_score"][j]),
    }
    if md5 is not None:
        rec["md5"] = md5
        rec["file_url"] = url
    return rec


def make_sample(out_dir: str | Path, *, n_posts: int = 2000, seed: int = 0, images: bool = True,
                tag_storage: str = "relation") -> SamplePaths:
    """Write the synthetic sample under out_dir (see the module docstring)."""
    _check_storage(tag_storage)
    if n_posts < 20:
        raise ValueError("n_posts must be at least 20 (the sample plants malformed rows)")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = make_vocabulary(400, 300, 150, 40, rng)
    posts = draw_posts(rng, n_posts)
    # a record written just before midnight on New Year's Eve, in its own offset
    posts["created_at"][n_posts // 3] = "2010-12-31T23:30:00.000-05:00"
    post_idx, tag_idx = draw_post_tags(rng, vocab, n_posts)
    order_rng = np.random.default_rng(seed + 1)
    db = root / "danbooru2023.db"
    _write_db(db, vocab, [(posts, post_idx, tag_idx, order_rng)], tag_storage, n_posts)

    # plant malformed rows: one per kind, on posts spread over the id range
    malformed: dict[int, str] = {}
    picks = rng.choice(np.arange(1, n_posts - 1), size=len(MALFORMED) + 1, replace=False)
    picks = [p for p in picks.tolist() if p != n_posts // 3][: len(MALFORMED) + 1]
    con = sqlite3.connect(db)
    for (name, (set_clause, field_name)), p in zip(MALFORMED.items(), picks):
        pid = int(posts["id"][p])
        con.execute(f'UPDATE "post" SET {set_clause} WHERE "id" = ?', (pid,))
        malformed[pid] = field_name
    broken = int(posts["id"][picks[-1]])
    if tag_storage == "relation":
        con.execute('INSERT INTO "posttagrelation" ("post_id", "tag_id") VALUES (?, ?)',
                    (broken, len(vocab.names) + 1000))
    else:
        con.execute('UPDATE "post" SET "tag_list" = "tag_list" || \'$z!#\' WHERE "id" = ?', (broken,))
    malformed[broken] = "tags"
    con.commit()
    con.execute("VACUUM")
    con.close()

    # JSON lines in Danbooru's API form: every well-formed post, then a few broken lines
    jsonl = root / "posts.jsonl"
    order = np.argsort(post_idx, kind="stable")
    bounds = np.searchsorted(post_idx[order], np.arange(n_posts + 1))
    names = np.array(vocab.names, dtype=object)
    with open(jsonl, "w", encoding="utf-8", newline="\n") as fh:
        for j in range(n_posts):
            if int(posts["id"][j]) in malformed:
                continue
            t = tag_idx[order[bounds[j]:bounds[j + 1]]]
            by_type = [sorted(names[t[vocab.types[t] == k]].tolist()) for k in range(len(TAG_TYPES))]
            fh.write(json.dumps(_jsonl_record(posts, j, vocab, by_type), sort_keys=False) + "\n")
        fh.write('{"id": 99000001, "created_at": "2020-01-01T00:00:00.000-05:00", "rating": "x"}\n')
        fh.write("{not json\n")
    shards = root / "images"
    if images:
        _write_shards(shards, posts, np.random.default_rng(seed + 2))
    return SamplePaths(root=root, db=db, shards=shards, jsonl=jsonl, malformed=malformed,
                       tag_storage=tag_storage)


def make_bench_db(path: str | Path, n_posts: int, seed: int = 0, *, tag_storage: str = "relation",
                  chunk: int = 200_000, progress: bool = True, tag_id_index: bool = True) -> Path:
    """A large HakuBooru-schema DB (n_posts, ~30 tags each, realistic tag popularity).

    tag_id_index=False leaves out the index on posttagrelation.tag_id (neither the readers
    nor HakuBooru's captioner use it; at 7.6M posts building it takes the most time).
    """
    _check_storage(tag_storage)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = max(n_posts / 7_600_000, 0.01)
    vocab = make_vocabulary(max(2000, int(30_000 * scale ** 0.5)), max(1000, int(250_000 * scale ** 0.7)),
                            max(500, int(60_000 * scale ** 0.7)), max(100, int(15_000 * scale ** 0.7)), rng)
    ids = draw_ids(rng, n_posts)

    def chunks():  # post fields drawn chunk by chunk: memory stays flat at any n_posts
        for lo in range(0, n_posts, chunk):
            hi = min(lo + chunk, n_posts)
            crng = np.random.default_rng([seed, lo])
            part = draw_posts(crng, hi - lo, ids=ids[lo:hi])
            p_idx, t_idx = draw_post_tags(crng, vocab, hi - lo)
            yield part, p_idx, t_idx, crng

    _write_db(path, vocab, chunks(), tag_storage, n_posts, progress=progress, tag_id_index=tag_id_index)
    return path
