"""Run `kxl fetch ARGS...` in this process with a disk that fills up after N bytes (fetch tests).

    python -m kxl_testing.fetch_child --disk-bytes N -- fetch release OUT ...

(the `kxl fetch` click group itself, without importing the rest of `kxl`, which loads torch)

Every file opened for writing in binary mode (io.open, which pathlib's Path.open and os.fdopen
use: huggingface_hub's .incomplete download files, kxl's atomic copies) shares one budget of N
bytes; the write that crosses it stores what still fits and raises OSError(ENOSPC), as a full
disk does. Without --disk-bytes the command runs unpatched.
"""
from __future__ import annotations

import errno
import io
import sys


class _Budget:
    left = 0


class _FillingWriter:
    def __init__(self, handle):
        self._handle = handle

    def write(self, data) -> int:
        size = len(data)
        if size > _Budget.left:
            fits = max(_Budget.left, 0)
            if fits:
                self._handle.write(bytes(memoryview(data)[:fits]))
                self._handle.flush()
            _Budget.left = 0
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        _Budget.left -= size
        return self._handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def fill_disk_after(n_bytes: int) -> None:
    _Budget.left = n_bytes
    real_open = io.open

    def open_on_small_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "b" in mode and any(c in mode for c in "wax+"):
            return _FillingWriter(handle)
        return handle

    io.open = open_on_small_disk


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit("usage: python -m kxl_testing.fetch_child [--disk-bytes N] -- fetch ARGS...")
    options, args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    if options[:1] == ["--disk-bytes"]:
        fill_disk_after(int(options[1]))
    if args[:1] != ["fetch"]:
        raise SystemExit("fetch_child runs `kxl fetch ...` only")
    from kxl_tools.fetch.cli import fetch_group

    return fetch_group(args[1:], prog_name="kxl fetch", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
