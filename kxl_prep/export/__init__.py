"""Image export: danbooru2023 tar shards -> the training image_dir (see docs/export.md).

index     shard discovery and the per-tar member index (id -> tar, offset, size)
plan      selection x index -> per-shard work units, posts not found (with reasons)
reader    one pread per image
process   decode / check / convert / resize / encode (bytes in, bytes or reject out)
writer    atomic image writes, the per-shard journal, stale temp cleanup
unit      one shard's work in one worker
distribute  processes on one machine, Ray, or --shard K/N slices
summary   meta.json rewrite, rejects file, summary
job       the whole export, as the `kxl-prep export` command runs it
"""
