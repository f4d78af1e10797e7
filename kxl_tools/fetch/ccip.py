"""`kxl fetch ccip`: one model of deepghs/ccip_onnx (a model repository), into the folder
`kxl eval score --ccip-model` takes: `<model>/model_feat.onnx`, `model_metrics.onnx` and
`metrics.json` (the names dghs-imgutils loads), placed flat in the target folder."""
from __future__ import annotations

from ..eval.ccip import DEFAULT_MODEL, FEAT_FILE, META_FILE, METRICS_FILE
from .hub import FetchError, Placement, Snapshot

REPO = "deepghs/ccip_onnx"
MODEL_FILES = (FEAT_FILE, METRICS_FILE, META_FILE)

__all__ = ["REPO", "DEFAULT_MODEL", "MODEL_FILES", "models", "plan"]


def models(snap: Snapshot) -> list[str]:
    """The folders of the repository that hold a model_feat.onnx."""
    return sorted(p.rsplit("/", 1)[0] for p in snap.files if p.endswith("/" + FEAT_FILE))


def plan(snap: Snapshot, model: str = DEFAULT_MODEL) -> list[Placement]:
    model = model.strip("/")
    wanted = [f"{model}/{name}" for name in MODEL_FILES]
    missing = [w for w in wanted if w not in snap.files]
    if len(missing) == len(wanted):
        raise FetchError(f"{snap.label}: no model {model!r}; it has {', '.join(models(snap)) or 'no model'}")
    if missing:
        raise FetchError(f"{snap.label}: model {model!r} lacks {', '.join(missing)}")
    return [Placement(snap.files[w], name) for w, name in zip(wanted, MODEL_FILES)]
