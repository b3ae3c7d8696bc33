"""The engine worker: one persistent thread, progress, re-entrancy guard, cancel, errors, callbacks on poll."""
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LesionLocator"))

from LesionLocatorLib.errors import Cancelled  # noqa: E402
from LesionLocatorSlicer.worker import EngineWorker, WorkerBusyError  # noqa: E402


@pytest.fixture
def worker():
    worker = EngineWorker()
    yield worker
    worker.shutdown()


def test_every_job_runs_on_the_same_engine_thread(worker):
    threads = [worker.runSync(lambda progress, cancel: threading.get_ident(), "job") for _ in range(3)]
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()


def test_progress_is_visible_while_the_job_runs_and_done_callbacks_run_on_poll(worker):
    reported, release = threading.Event(), threading.Event()
    callbacks = []

    def job(progress, cancel):
        progress(0.4, "registering 2/5")
        reported.set()
        release.wait(5)
        return 42

    submitted = worker.submit(job, "long job", onDone=lambda done: callbacks.append((done.result, threading.get_ident())))
    assert reported.wait(5)
    assert submitted.progress == (0.4, "registering 2/5") and worker.busy
    release.set()
    submitted.finished.wait(5)
    assert callbacks == []  # nothing runs on the engine thread: the main thread polls
    assert worker.poll() == [submitted]
    assert callbacks == [(42, threading.get_ident())] and not worker.busy


def test_a_second_job_is_refused_while_one_runs(worker):
    release = threading.Event()
    first = worker.submit(lambda progress, cancel: release.wait(5), "segmenting Lesion 1")
    with pytest.raises(WorkerBusyError, match="segmenting Lesion 1"):
        worker.submit(lambda progress, cancel: None, "tracking")
    release.set()
    first.finished.wait(5)
    assert worker.runSync(lambda progress, cancel: "accepted again", "tracking") == "accepted again"


def test_cancel_sets_the_event_the_job_checks(worker):
    started = threading.Event()

    def job(progress, cancel):
        started.set()
        if not cancel.wait(5):
            return "not cancelled"
        raise Cancelled("Cancelled by the user.")

    submitted = worker.submit(job, "cancellable")
    started.wait(5)
    worker.cancel()
    submitted.finished.wait(5)
    with pytest.raises(Cancelled):
        submitted.resultOrRaise()


def test_errors_reach_the_caller(worker):
    def failing(progress, cancel):
        raise ValueError("readable message")

    with pytest.raises(ValueError, match="readable message"):
        worker.runSync(failing, "failing job")
    assert not worker.busy
