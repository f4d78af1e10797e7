"""kxl_prep: danbooru2023 metadata -> Epsilon captions, buckets and sd-scripts dataset config."""

__version__ = "0.1.0"
