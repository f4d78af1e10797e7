"""JSON text built column-wise with pyarrow: string literals byte-identical to
json.dumps(..., ensure_ascii=False), rows joined without a Python loop per row (meta.json,
buckets.json, and the fingerprints of kxl's columnar training records)."""
from __future__ import annotations

from json.encoder import encode_basestring  # C-accelerated, keeps non-ASCII as is
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LARGE = pa.large_string()
_CONTROL = r"[\x00-\x1f]"


def json_ints(values: Any) -> pa.Array:
    return pc.cast(pa.array(np.asarray(values, dtype=np.int64)), LARGE)


def json_strings(values: pa.Array) -> pa.Array:
    """JSON string literals, byte-identical to json.dumps(..., ensure_ascii=False)."""
    values = values.cast(LARGE)
    if pc.any(pc.match_substring_regex(values, _CONTROL)).as_py():
        # rare: control characters get json's own escapes
        return pa.array([encode_basestring(v) for v in values.to_pylist()], LARGE)
    escaped = pc.replace_substring(pc.replace_substring(values, "\\", "\\\\"), '"', '\\"')
    quote = pa.scalar('"', LARGE)
    return pc.binary_join_element_wise(quote, escaped, quote, pa.scalar("", LARGE))


def json_join(parts: list, separator: str = ",\n") -> str:
    """Row-wise concatenation of string columns and constants, rows joined by `separator`."""
    parts = [pa.scalar(p, LARGE) if isinstance(p, str) else p for p in parts]
    lines = pc.binary_join_element_wise(*parts, pa.scalar("", LARGE))
    whole = pa.LargeListArray.from_arrays(pa.array([0, len(lines)], pa.int64()), lines)
    return pc.binary_join(whole, pa.scalar(separator, LARGE))[0].as_py()
