"""`kxl fetch`: from the hub, exactly what a run needs (see docs/fetch.md).

One module per job: metadata (HakuBooru's database), release (the released rev1 files for
`kxl compare-run`), ccip (deepghs' CCIP model for `kxl eval score`), images (a prep dir's
selected images by range requests: images, pools + pools.toml, hub_index, coalesce, ranged,
source, images_cli); hub holds what they share (huggingface_hub client, retries,
verification, atomic placement, errors); cli the click group."""
