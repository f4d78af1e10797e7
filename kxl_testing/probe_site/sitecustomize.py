"""Starts kxl_testing.train_probe in every Python process of a benchmark run (this folder is put
first on PYTHONPATH with KXL_BENCH_PROBE=DIR); then runs the sitecustomize this one shadows."""
import importlib.machinery
import os
import sys

if os.environ.get("KXL_BENCH_PROBE"):
    from kxl_testing.train_probe import install

    install()

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
