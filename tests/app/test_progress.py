"""Progress display: rich bars with ETA, accuracy and loss on a terminal; plain log lines otherwise;
nothing with ``--quiet``."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedtalora.app.progress import ProgressBars

BAR = "━"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ROUND_LINE = re.compile(r"INFO fedtalora\.fed\.loop: \[task (\d)/2 \| round (\d)/2\] loss=")


def test_not_a_terminal_gives_plain_log_lines_and_no_bar(run_cli, tiny_overrides, tmp_path) -> None:
    rc, out, err = run_cli(["run", "tiny-vit", *tiny_overrides, f"output.dir={tmp_path}", "output.name=plain"])
    assert rc == 0, err
    for text in (out, err):
        assert BAR not in text and "\r" not in text and "\x1b[" not in text
    rounds = [(int(t), int(r)) for t, r in ROUND_LINE.findall(err)]
    assert rounds == [(1, 1), (1, 2), (2, 1), (2, 2)]  # one plain line per round, in order
    assert err.count("accuracy on seen classes") == 2  # and one per task
    assert out.startswith("model ") and "\nmetric " in out  # stdout holds only the summary: what ran, the metrics
    assert "final average accuracy (F_AA)" in out


def _run_in_pty(args: list[str], cwd: Path, cli_env: dict[str, str], limit: float = 300.0) -> tuple[int, str]:
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal; returns (exit code, all output)."""
    master, slave = pty.openpty()
    env = {**cli_env, "TERM": "xterm", "COLUMNS": "160"}
    proc = subprocess.Popen([sys.executable, "-m", "fedtalora", *args], cwd=cwd, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + limit  # a guard against a hung child, not a timing assertion
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal test needs Linux")
def test_terminal_shows_bars_with_eta_accuracy_and_loss(tiny_overrides, tmp_path, cli_env) -> None:
    rc, text = _run_in_pty(["run", "tiny-vit", *tiny_overrides, f"output.dir={tmp_path}", "output.name=tty"], tmp_path,
                           cli_env)
    plain = ANSI.sub("", text)
    assert rc == 0, plain[-2000:]
    assert BAR in plain
    for needle in ("tasks", "task 2/2 rounds", "clients", "eta", "acc 0.", "loss ", "agg. error"):
        assert needle in plain, needle
    assert not ROUND_LINE.search(plain)  # the bar replaces the per-round log lines
    assert "final average accuracy (F_AA)" in plain


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal test needs Linux")
def test_quiet_draws_nothing_even_on_a_terminal(tiny_overrides, tmp_path, cli_env) -> None:
    rc, text = _run_in_pty(["run", "tiny-vit", "--quiet", *tiny_overrides, f"output.dir={tmp_path}", "output.name=q"],
                           tmp_path, cli_env)
    plain = ANSI.sub("", text)
    assert rc == 0, plain[-2000:]
    assert BAR not in plain and "INFO" not in plain and not re.search(r"\beta\b", plain)  # ("beta=" is data)
    assert plain.lstrip().startswith("model ") and "\nmetric " in plain  # only the result is printed
    assert "final average accuracy (F_AA)" in plain


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=160, color_system=None), buf


def test_progress_bars_follow_the_events() -> None:
    """Events of a resumed run (2 of 4 rounds done), a dropped client and a skipped round."""
    console, buf = _console()
    with ProgressBars(enabled=True, console=console) as progress:
        progress({"event": "start", "num_tasks": 2, "rounds_per_task": 2, "clients_per_round": 2,
                  "completed_rounds": 2})
        progress({"event": "client", "task": 1, "round": 0, "client": 0, "loss": 0.75})
        progress({"event": "client", "task": 1, "round": 0, "client": 1, "loss": None})
        progress({"event": "round", "task": 1, "round": 0, "train_loss": 0.5, "aggregation_error": 1e-7})
        progress({"event": "round", "task": 1, "round": 1, "train_loss": None, "aggregation_error": None})
        progress({"event": "task", "task": 1, "accuracy": [0.5, 1.0], "seen_accuracy": 0.75})
        progress({"event": "end", "metrics": {}})
        bar = progress._bar
        tasks = bar.tasks[0]
        assert tasks.completed == tasks.total == 2
        assert bar.tasks[1].completed == 2  # rounds of task 2
    text = buf.getvalue()
    assert "acc 0.750  loss 0.500" in text
    assert "dropped out" in text and "skipped" in text and "agg. error 1.0e-07" in text


def test_progress_tasks_bar_advances_by_round() -> None:
    console, _ = _console()
    with ProgressBars(enabled=True, console=console) as progress:
        progress({"event": "start", "num_tasks": 3, "rounds_per_task": 4, "clients_per_round": 1})
        progress({"event": "round", "task": 0, "round": 0, "train_loss": 1.0, "aggregation_error": 0.0})
        assert progress._bar.tasks[0].completed == pytest.approx(0.25)
        progress({"event": "round", "task": 0, "round": 1, "train_loss": 1.0, "aggregation_error": 0.0})
        assert progress._bar.tasks[0].completed == pytest.approx(0.5)


def test_disabled_progress_draws_nothing(capsys) -> None:
    with ProgressBars(enabled=False) as progress:
        progress({"event": "start", "num_tasks": 1, "rounds_per_task": 1, "clients_per_round": 1})
        progress({"event": "task", "task": 0, "accuracy": [1.0], "seen_accuracy": 1.0})
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
