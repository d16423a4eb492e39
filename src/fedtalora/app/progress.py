"""Progress display of a run on a terminal: the loop's events drawn as rich progress bars."""

from __future__ import annotations

from typing import Any

__all__ = ["ProgressBars"]


class ProgressBars:
    """Rich progress bars over tasks, rounds and clients, with ETA, accuracy and loss (terminal only).

    The tasks bar advances by round, so its ETA covers the whole run; its info shows the accuracy on all
    classes seen after the last finished task and the last round's training loss.
    """

    def __init__(self, enabled: bool, console: Any = None) -> None:
        self.enabled = enabled
        self._console = console
        self._bar: Any = None
        self._acc: float | None = None
        self._loss: float | None = None

    def __enter__(self) -> ProgressBars:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description:<16}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self._console or Console(stderr=True), transient=False)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def _summary(self) -> str:
        acc = "acc n/a" if self._acc is None else f"acc {self._acc:.3f}"
        return acc if self._loss is None else f"{acc}  loss {self._loss:.3f}"

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if self._bar is None:
            return
        bar = self._bar
        if kind == "start":
            self._T, self._R, self._m = event["num_tasks"], event["rounds_per_task"], event["clients_per_round"]
            done = event.get("completed_rounds", 0)
            t, r = divmod(done, self._R)  # a resumed run starts part-way
            self._tasks = bar.add_task("tasks", total=self._T, completed=done / self._R, info=self._summary())
            self._rounds = bar.add_task(f"task {min(t + 1, self._T)}/{self._T} rounds", total=self._R, completed=r,
                                        info="")
            self._clients = bar.add_task(f"round {r + 1} clients", total=self._m, info="")
        elif kind == "client":
            loss = event["loss"]
            bar.update(self._clients, advance=1, info="dropped out" if loss is None else f"loss {loss:.3f}")
        elif kind == "round":
            t, r = event["task"], event["round"]
            err, loss = event["aggregation_error"], event.get("train_loss")
            if loss is not None:
                self._loss = loss
            info = "skipped" if err is None else f"loss {loss:.3f}  agg. error {err:.1e}"
            if err is not None and event.get("aggregation_error_rounding") is not None:
                info += f" ({event['aggregation_error_rounding']:.2g} u|W|)"  # float32 roundings of the weight
            bar.update(self._rounds, advance=1, info=info)
            bar.update(self._tasks, completed=t + (r + 1) / self._R, info=self._summary())
            if r + 1 < self._R:
                bar.reset(self._clients, total=self._m, description=f"round {r + 2} clients")
        elif kind == "task":
            self._acc = event["seen_accuracy"]
            t = event["task"] + 1
            bar.update(self._tasks, completed=t, info=self._summary())
            if t < self._T:
                bar.reset(self._rounds, total=self._R, description=f"task {t + 1}/{self._T} rounds")
                bar.reset(self._clients, total=self._m, description="round 1 clients")
