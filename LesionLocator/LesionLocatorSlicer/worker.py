"""One persistent engine thread: all model work runs on it, so per-thread GPU state and model caches are reused.

Plain Python (no Qt): the Widget polls `EngineWorker.poll()` from a QTimer on the main thread, which is where the
job's `onDone` callback runs, so MRML and Qt objects are only touched on the main thread. Jobs receive
`(progress, cancelEvent)`; progress is stored on the job and read by the main thread.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from LesionLocatorLib.errors import LesionLocatorError

ProgressCallback = Callable[[float, str], None]
JobFunction = Callable[[ProgressCallback, threading.Event], Any]


class WorkerBusyError(LesionLocatorError):
    """A job was submitted while another one is still running."""


@dataclass(eq=False)
class Job:
    function: JobFunction
    description: str
    onDone: Callable[["Job"], None] | None = None
    cancelEvent: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    progress: tuple[float, str] = (0.0, "waiting")
    result: Any = None
    error: BaseException | None = None

    def reportProgress(self, fraction: float, stage: str) -> None:
        self.progress = (float(fraction), stage)  # one tuple assignment: the main thread never sees half an update

    def resultOrRaise(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class EngineWorker:
    """Runs one job at a time on a single daemon thread, started on first use."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self._unreported: list[Job] = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def currentJob(self) -> Job | None:
        return self._current

    def submit(self, function: JobFunction, description: str, onDone: Callable[[Job], None] | None = None) -> Job:
        """Queue a job; refused while another runs (the GUI disables its buttons, scripts get a clear error)."""
        with self._lock:
            if self._current is not None:
                raise WorkerBusyError(
                    f"LesionLocator is still busy ({self._current.description}). Wait for it or press Cancel."
                )
            job = Job(function, description, onDone)
            self._current = job
        self._ensureThread()
        self._jobs.put(job)
        return job

    def runSync(self, function: JobFunction, description: str) -> Any:
        """Run a job on the engine thread and wait for it (console scripting); raises the job's error."""
        job = self.submit(function, description)
        job.finished.wait()
        self.poll()
        return job.resultOrRaise()

    def cancel(self) -> None:
        job = self._current
        if job is not None:
            job.cancelEvent.set()

    def poll(self) -> list[Job]:
        """Finished jobs since the last poll, their `onDone` run here (call from the main thread)."""
        with self._lock:
            finished, self._unreported = self._unreported, []
        for job in finished:
            if job.onDone is not None:
                job.onDone(job)
        return finished

    def shutdown(self, timeout: float = 5.0) -> None:
        self.cancel()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _ensureThread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="LesionLocatorEngine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.function(job.reportProgress, job.cancelEvent)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread, which shows it
                job.error = error
            with self._lock:
                self._current = None
                self._unreported.append(job)
            job.finished.set()
