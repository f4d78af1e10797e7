import time

import pytest

from kxl_common.lock import file_lock


def test_a_held_lock_times_out_and_a_released_one_is_taken(tmp_path):
    path = tmp_path / "sub" / "x.lock"
    with file_lock(path):  # flock conflicts between two open files, even in one process
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="still locked"):
            with file_lock(path, timeout=0.3, poll=0.05):
                pass
        assert time.monotonic() - started >= 0.3
    with file_lock(path, timeout=0.3):
        pass
