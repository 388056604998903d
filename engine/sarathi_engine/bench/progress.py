"""The live display while a benchmark runs: one rich progress bar per run (sent and finished
requests), and one status line per step (starting a server, calibrating, a probe's verdict)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sarathi_engine.bench.records import RequestRecord


class BenchProgress:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("sent {task.fields[sent]}, failed {task.fields[failed]}"),
                                 TimeElapsedColumn(), console=self.console)
        self.prefix = ""

    def __enter__(self) -> BenchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def note(self, message: str) -> None:
        self.progress.console.log(message)

    def hooks(self, label: str, total: int):
        task = self.progress.add_task(f"{self.prefix}{label}", total=total, sent=0, failed=0)
        counts = {"sent": 0, "failed": 0}

        def on_sent(_: int) -> None:
            counts["sent"] += 1
            self.progress.update(task, sent=counts["sent"])

        def on_done(record: RequestRecord) -> None:
            counts["failed"] += not record.ok
            self.progress.update(task, advance=1, failed=counts["failed"])

        return on_sent, on_done
