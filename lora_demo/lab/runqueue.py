"""The training queue: one worker thread per training slot (LORA_LAB_TRAIN_SLOTS, default 1), each on
its own copy of the base model, taking runs first in, first out. A waiting run knows its position
and, when every run ahead of it has an estimate, its expected wait. Closing a browser tab does not
touch a run; stopping one that waits ends it before it starts."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from lora_demo.core.inject import remove_lora
from lora_demo.lab import records
from lora_demo.lab.records import Job
from lora_demo.lab.store import RunStore

log = logging.getLogger(__name__)


class RunQueue:
    def __init__(self, store: RunStore, trainers: list, execute: Callable[[Job, object], None]):
        """``execute(job, trainer)`` runs one job on one slot's model."""
        self.store, self.trainers, self.execute = store, trainers, execute
        self.pending: queue.Queue[Job] = queue.Queue()
        self.waiting: list[str] = []                    # job ids in queue order (guarded by store.lock)
        self.workers = [threading.Thread(target=self._work, args=(model,), daemon=True, name=f"lora-train-{i}")
                        for i, model in enumerate(trainers)]
        for worker in self.workers:
            worker.start()

    @property
    def slots(self) -> int:
        return len(self.trainers)

    def put(self, job: Job) -> None:
        with self.store.lock:
            self.waiting.append(job.id)
        self.pending.put(job)

    def position(self, job: Job) -> int:
        """1 = next to run; 0 = not waiting."""
        with self.store.lock:
            return self.waiting.index(job.id) + 1 if job.id in self.waiting else 0

    def expected_wait(self, job: Job) -> float | None:
        """Seconds until ``job`` starts, if every run before it has an estimate: the running runs' ETAs (at
        the pace of their last steps) and, for the runs ahead in line, the budget's predicted step time times
        their steps. Shared by the training slots. None while any of them has none (nothing is guessed)."""
        with self.store.lock:
            if job.id not in self.waiting:
                return None
            ahead = [self.store.jobs[i] for i in self.waiting[:self.waiting.index(job.id)]]
            running = [j for j in self.store.jobs.values() if j.status == "running"]
        etas = [j.eta_s() for j in running]
        steps = [((j.prediction or {}).get("lora") or {}).get("step_s_est") for j in ahead]
        if any(e is None for e in etas) or not all(steps):
            return None
        return (sum(etas) + sum(s * j.config.train.steps for s, j in zip(steps, ahead))) / self.slots

    def status(self, job: Job) -> dict:
        return records.status(job, self.position(job), self.expected_wait(job))

    def watch(self, job: Job, poll_s: float = 0.4):
        """Poll a job until it ends, yielding its status whenever something changed."""
        seen = None
        while True:
            done = job.done.is_set()
            key = (job.version, job.status, self.position(job))
            if key != seen:
                seen = key
                yield self.status(job)
            if done:
                return
            job.done.wait(poll_s)

    def stop(self, run_id: str) -> Job | None:
        """Stop one run, or every unfinished run of a sweep when given a sweep id."""
        job = self.store.jobs.get(run_id)
        targets = [job] if job else [j for j in list(self.store.jobs.values()) if j.sweep and j.sweep == run_id]
        for j in targets:
            j.stop.set()
        return job or (targets[0] if targets else None)

    def _work(self, trainer) -> None:
        while True:
            job = self.pending.get()
            with self.store.lock:
                self.waiting.remove(job.id)
            try:
                if job.stop.is_set():
                    job.status, job.error = "stopped", "stopped while waiting in the queue"
                    job.save()
                else:
                    self.execute(job, trainer)
            except Exception as exc:  # never let one job kill the worker; the record says what happened
                log.exception("job %s crashed", job.id)
                job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
                job.save()
            finally:
                remove_lora(trainer)
                job.version += 1
                job.done.set()
