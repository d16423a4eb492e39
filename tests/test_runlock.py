"""One writer per run directory (:mod:`fedtalora.runlock`): a second writer is refused in one line, and the
lock dies with its holder, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtalora.errors import ConfigError
from fedtalora.runlock import LOCK_NAME, RunLock


def test_a_second_writer_is_refused_in_one_line(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError) as info:
            RunLock(tmp_path).acquire()
        msg = str(info.value)
        assert "\n" not in msg and f"is in use by process {os.getpid()}" in msg and str(tmp_path) in msg
    with RunLock(tmp_path) as again:  # released on exit
        assert again.held
    assert not again.held


def test_the_lock_dies_with_its_holder_even_on_sigkill(tmp_path: Path, cli_env) -> None:
    code = ("import sys, time; from fedtalora.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=cli_env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by process {proc.pid}"):
            RunLock(tmp_path).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while True:  # the kernel drops the lock with the process
            try:
                RunLock(tmp_path).acquire().release()
                break
            except ConfigError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def test_lock_on_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot lock the run directory .*No such file"):
        RunLock(tmp_path / "nope").acquire()
