"""Progress of long commands: live rich bars on a terminal, plain log lines everywhere else.

One facility for every command (extract, fit, sweep, report, cka, tree bench, the demos)::

    with progress_display(console) as display:
        with display.spinner("loading dinov2-tiny"):        # work of unknown length
            ...
        stage = display.task("ffm stage 1/2: lr", total=3, unit="lr", echo=True)
        epochs = display.task("ffm lr 0.005 epoch", total=30, unit="epoch", parent=stage)
        epochs.advance(note="train 0.12 val 0.15")          # "... epoch 1/30 train 0.12 ..."
        epochs.finish()
        stage.advance(note="(0.005) done, 12/30 epochs")
        display.log("anything else, printed once")

Live mode (``console.is_terminal``): one ``rich.progress.Progress`` shows every open task as a
row: spinner, description (indented under its parent), bar, k/N, rate, note, elapsed, ETA; a
task of unknown length is a spinner and elapsed time only. Finished tasks leave the display;
what they and ``log`` print stays above it. Tasks made with ``echo=True`` (coarse steps:
learning rates, sweep points, demo steps) also print each step's line, so the scrollback keeps
a record.

Plain mode (pipes, CI logs, ``--json`` with progress on stderr, tests): no live display and no
carriage returns; each ``advance`` prints one line::

    ffm lr 0.005 epoch 3/30 train 0.12 val 0.15 | elapsed 1.2 s, ETA 11 s

with ETA = elapsed / k x (N - k) for k of N steps since the task began (live mode shows the
same estimate); a task made with ``plain_every=s`` prints at most one line per s seconds (and
always its last step). A spinner prints a line when it starts and one when it ends.

Import cost: rich only (``cli`` starts without torch, tests/test_cli_startup.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Task as RichTask
from rich.text import Text

__all__ = ["ProgressDisplay", "Task", "FitProgress", "progress_display", "duration"]


def duration(seconds: float) -> str:
    """Human time: "0.4 s", "12 s", "3 min 05 s", "1 h 02 min"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class _KnownTotal(ProgressColumn):
    """``column``, or nothing for a task of unknown length (a spinner has no bar, no k/N)."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: RichTask) -> RenderableType:
        return Text("") if task.total is None else self.column.render(task)


class _RateColumn(ProgressColumn):
    """Steps per second in the task's unit ("12.3 img/s"), or seconds per step when slower
    than one a second ("4.1 s/epoch"); blank before the first step."""

    def render(self, task: RichTask) -> Text:
        owner: Task = task.fields["owner"]
        rate = owner.rate()
        if not owner.unit or not rate:
            return Text("")
        text = f"{rate:.1f} {owner.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{owner.unit}"
        return Text(text, style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """``Task.eta`` as h:mm:ss (the same estimate as plain mode's lines)."""

    def render(self, task: RichTask) -> Text:
        owner: Task = task.fields["owner"]
        if owner.total is None:
            return Text("")
        eta = owner.eta()
        if eta is None:
            return Text("-:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(eta), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class Task:
    """One line of work: ``total`` steps (None: unknown, shown as a spinner)."""

    def __init__(
        self,
        display: ProgressDisplay,
        description: str,
        total: int | None,
        *,
        completed: int = 0,
        unit: str = "",
        depth: int = 0,
        echo: bool = False,
        plain_every: float = 0.0,
        quiet: bool = False,
    ) -> None:
        self.display = display
        self.description = description
        self.total = total
        self.completed = completed
        self.unit = unit
        self.depth = depth
        self.echo = echo
        self.plain_every = plain_every
        self.quiet = quiet  # prints no line (shown in the live display only)
        self.note = ""
        self.started = time.perf_counter()
        self._started_at = completed  # steps done before this process (a resumed run)
        self._printed = -float("inf")
        self.finished = False
        self.spinning = total is None  # a spinner: a line at each end in plain mode
        self._id = None
        if display.live is not None:
            self._id = display.live.add_task(
                "  " * depth + description, total=total, completed=completed, note="", owner=self
            )
        elif self.spinning and not self.quiet:
            display.log(f"{description} ...")

    def __enter__(self) -> Task:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.finish(None if exc_type is None else "")  # an error speaks for itself

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def rate(self) -> float | None:
        """Steps per second since this task began (None before its first step)."""
        done = self.completed - self._started_at
        return done / max(self.elapsed, 1e-9) if done > 0 else None

    def eta(self) -> float | None:
        """Seconds left at the mean rate since this task began, elapsed / k x (N - k) for k
        steps done of N (None: unknown)."""
        rate = self.rate()
        if self.total is None or rate is None:
            return None
        return max(self.total - self.completed, 0) / rate

    def line(self) -> str:
        """The plain-mode line of the task's current state."""
        count = f" {self.completed}" if self.total is None else f" {self.completed}/{self.total}"
        note = f" {self.note}" if self.note else ""
        timing = f"elapsed {duration(self.elapsed)}"
        eta = self.eta()
        if eta is not None and self.completed < self.total:
            timing += f", ETA {duration(eta)}"
        return f"{self.description}{count}{note} | {timing}"

    def update(
        self,
        *,
        completed: int | None = None,
        total: int | None = None,
        note: str | None = None,
    ) -> None:
        """Change the task's state without a step (nothing printed)."""
        with self.display.lock:
            if completed is not None:
                self.completed = completed
            if total is not None:
                self.total = total
            if note is not None:
                self.note = note
            if self._id is not None:
                self.display.live.update(
                    self._id, completed=self.completed, total=self.total, note=self.note
                )

    def advance(self, amount: int = 1, *, note: str | None = None, resumed: bool = False) -> None:
        """``amount`` steps done; ``note`` says how they went. Plain mode prints the line.
        ``resumed``: steps found done (a resumed sweep), before any other step: counted, but
        left out of the rate and ETA."""
        self.update(completed=self.completed + amount, note=note)
        now = time.perf_counter()
        if resumed:
            self._started_at, self.started = self.completed, now
        last = self.total is not None and self.completed >= self.total
        if self.display.live is not None:
            if self.echo:
                self.display.log(self.line())
        elif not self.quiet and (last or now - self._printed >= self.plain_every):
            self._printed = now
            self.display.log(self.line())

    def finish(self, message: str | None = None) -> None:
        """Close the task (it leaves the live display); print ``message`` if given (a
        spinner's default: how long it took). Closing twice is harmless."""
        if self.finished:
            return
        self.finished = True
        if self._id is not None:
            self.display.live.remove_task(self._id)
        if message is None and self.spinning and not self.quiet:
            message = f"{self.description}: done in {duration(self.elapsed)}"
        if message:
            self.display.log(message)


class ProgressDisplay:
    """Tasks and log lines on one console (see the module docstring for the two modes)."""

    def __init__(self, console: Console, *, plain: bool | None = None) -> None:
        self.console = console
        self.plain = (not console.is_terminal) if plain is None else plain
        self.lock = threading.RLock()
        self.live: Progress | None = None
        if not self.plain:
            self.live = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),
                _KnownTotal(BarColumn(bar_width=30)),
                _KnownTotal(MofNCompleteColumn()),
                _RateColumn(),
                TextColumn("{task.fields[note]}", markup=False),
                TimeElapsedColumn(),
                _EtaColumn(),
                console=console,
                transient=True,
            )

    def task(
        self,
        description: str,
        total: int | None = None,
        *,
        completed: int = 0,
        unit: str = "",
        parent: Task | None = None,
        echo: bool = False,
        plain_every: float = 0.0,
        quiet: bool = False,
    ) -> Task:
        """A new task; ``parent`` nests it (indented) under another one. ``echo``: live mode
        prints each step's line too; ``plain_every``: seconds between plain lines; ``quiet``:
        no plain lines (work too short or minor to log, shown live only)."""
        depth = 0 if parent is None else parent.depth + 1
        with self.lock:
            return Task(
                self,
                description,
                total,
                completed=completed,
                unit=unit,
                depth=depth,
                echo=echo,
                plain_every=plain_every,
                quiet=quiet,
            )

    @contextmanager
    def spinner(self, description: str, parent: Task | None = None) -> Iterator[Task]:
        """Work of unknown length (loading a model) for the duration of the block: a
        spinner, or in plain mode a line at each end ("loading x ...", "loading x: done in
        2.1 s")."""
        with self.task(description, None, parent=parent) as task:
            yield task

    def log(self, message: RenderableType) -> None:
        """Print once, above the live display (plain text is never read as markup)."""
        with self.lock:
            target = self.live.console if self.live is not None else self.console
            if isinstance(message, str):
                target.print(message, markup=False, highlight=False, soft_wrap=True)
            else:
                target.print(message)


@contextmanager
def progress_display(console: Console, *, plain: bool | None = None) -> Iterator[ProgressDisplay]:
    """A ``ProgressDisplay`` on ``console`` for the duration of the block. ``plain``: force a
    mode (default: live bars exactly when ``console.is_terminal``)."""
    display = ProgressDisplay(console, plain=plain)
    if display.live is None:
        yield display
        return
    with display.live:
        yield display


class FitProgress:
    """``stitchtrain.pipeline.fit`` progress events -> tasks: a spinner until training starts,
    one task per stage (learning rates k of N, echoed), one per learning rate (epochs k of the
    maximum, 1-based), a spinner for the test evaluation (the spinners: live mode only).

    The events (dicts; ``event`` says which): "lr_start" (stage, stage_index, stages, lr,
    lr_index, lrs, epoch: epochs already done, epochs: the maximum), "epoch" (a history row,
    epoch counted from 1, plus epochs), "lr_done" (stage, lr, epochs_run, epochs, best_epoch
    counted from 1, val_loss, stopped_early), "stage_reused" (stage, stage_index, stages,
    from: the run dir it was taken from, val_loss), "resume" (message: where a resumed fit
    starts), "evaluate". Call ``close`` (or use ``with``) when fit returns.
    """

    def __init__(self, display: ProgressDisplay, *, parent: Task | None = None) -> None:
        self.display = display
        self.parent = parent
        self.stage: Task | None = None
        self.stage_name: str | None = None
        self.epochs: Task | None = None
        self.waiting: Task | None = display.task(
            "preparing (stores, target encoder)", None, parent=parent, quiet=True
        )

    def __enter__(self) -> FitProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_waiting(self) -> None:
        if self.waiting is not None:
            self.waiting.finish()
            self.waiting = None

    def __call__(self, event: dict[str, Any]) -> None:
        self._stop_waiting()
        kind = event["event"]
        if kind == "lr_start":
            if event["stage"] != self.stage_name:
                if self.stage is not None:
                    self.stage.finish()
                count = f"{event['stage_index'] + 1}/{len(event['stages'])}"
                stage = f"{event['stage']} stage {count}: lr"
                self.stage = self.display.task(
                    stage, event["lrs"], completed=event["lr_index"], unit="lr",
                    parent=self.parent, echo=True,
                )  # fmt: skip
                self.stage_name = event["stage"]
            self.epochs = self.display.task(
                f"{event['stage']} lr {event['lr']:g} epoch",
                event["epochs"],
                completed=event["epoch"],
                unit="epoch",
                parent=self.stage,
            )
        elif kind == "epoch" and self.epochs is not None:
            metric = "" if event["val_metric"] is None else f" val metric {event['val_metric']:.4f}"
            self.epochs.advance(
                note=f"train {event['train_loss']:.4g} val {event['val_loss']:.4g}{metric} "
                f"({event['seconds']:.2f} s, data wait {event['data_wait_s']:.2f} s, "
                f"{event['data_gb_per_s']:.2f} GB/s)"
            )
        elif kind == "lr_done" and self.stage is not None:
            if self.epochs is not None:
                self.epochs.finish()
                self.epochs = None
            stopped = " (early stop)" if event["stopped_early"] else ""
            self.stage.advance(
                note=f"({event['lr']:g}) done, {event['epochs_run']}/{event['epochs']} "
                f"epochs{stopped}, best epoch {event['best_epoch']}, "
                f"val loss {event['val_loss']:.4g}"
            )
        elif kind == "stage_reused":
            self._close_training()
            count = f"{event['stage_index'] + 1}/{len(event['stages'])}"
            self.display.log(
                f"{event['stage']} stage {count}: taken from {event['from']} (the same stage, "
                f"finished there; val loss {event['val_loss']:.4g})"
            )
        elif kind == "resume":
            self.display.log(event["message"])
        elif kind == "evaluate":
            self._close_training()
            self.waiting = self.display.task(
                "evaluating on the test split", None, parent=self.parent, quiet=True
            )

    def _close_training(self) -> None:
        for task in (self.epochs, self.stage):
            if task is not None:
                task.finish()
        self.epochs = self.stage = None
        self.stage_name = None

    def close(self) -> None:
        self._stop_waiting()
        self._close_training()
