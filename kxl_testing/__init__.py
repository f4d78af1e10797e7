"""Test, benchmark and demo support: synthetic data, random-weight models, offline tokenizers and
stand-in model files. Nothing in kxl_common, kxl_prep, kxl_train or kxl_tools imports it."""
