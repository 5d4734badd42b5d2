"""The run store: every run's record by id, who owns it, and how much a session may keep.

Records are loaded from the runs directory at start (a server killed mid-run left some unfinished:
they come back interrupted), listed per owner key, deleted only on an explicit request, and each
session's runs and checkpoints stay within the deployment's limits (LORA_LAB_MAX_*)."""

from __future__ import annotations

import logging
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from lora_demo.core.config import ConfigError, limits
from lora_demo.lab import owners
from lora_demo.lab.records import RECORD, Job, prune_checkpoints

log = logging.getLogger(__name__)
CONNECTIONS_KEPT = 100_000   # API connections whose implicit owner key is remembered (oldest forgotten first)


class RunStore:
    def __init__(self, runs_dir: Path | str):
        self.dir = Path(runs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()                    # guards jobs (and the queue's order: lab.queue)
        self._connection_keys: OrderedDict[str, str] = OrderedDict()   # API connection -> its owner key
        for run_dir in sorted(p for p in self.dir.iterdir() if (p / RECORD).is_file()):
            try:
                job = Job.load(run_dir)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable run record %s: %s", run_dir, exc)
                continue
            self.jobs[job.id] = job   # listed even if trained on another base model (Lab.owned says so)
        log.info("loaded %d run records from %s", len(self.jobs), self.dir)

    def add(self, job: Job) -> None:
        with self.lock:
            self.jobs[job.id] = job

    def runs(self, session: str | None = None) -> list[Job]:
        """Runs of one session (or all, with None), oldest first."""
        jobs = [j for j in list(self.jobs.values()) if session is None or j.owned_by(session)]
        return sorted(jobs, key=lambda j: j.created)

    def get(self, run_id: str, session: str | None) -> Job:
        """Run ``run_id`` if it exists and belongs to ``session`` (any session with None)."""
        job = self.jobs.get(run_id or "")
        if job is None:
            raise ConfigError(f"no run {run_id!r} on this server" if run_id else "choose a run first")
        if session is not None and not job.owned_by(session):
            raise ConfigError(f"run {run_id!r} belongs to another session")
        return job

    def delete(self, run_id: str, session: str | None) -> Job:
        """Remove a finished run of ``session`` and its directory (an explicit user action)."""
        job = self.get(run_id, session)
        if not job.done.is_set() and job.status in ("queued", "running"):
            raise ConfigError(f"run {run_id!r} is still {job.status}; stop it first")
        with self.lock:
            self.jobs.pop(job.id, None)
        if job.dir.resolve().parent == self.dir.resolve():   # never anything outside the runs dir
            shutil.rmtree(job.dir, ignore_errors=True)
        return job

    def room_for(self, session: str, n: int) -> None:
        """Refuse (with what to do) when ``session`` would keep more runs than the deployment allows, or
        have more queued or running at once (on a shared Space one visitor's 50 runs would hold it for hours)."""
        lim = limits()
        mine = self.runs(session)
        if len(mine) + n > lim.max_runs_per_session:
            raise ConfigError(f"this session keeps at most {lim.max_runs_per_session} runs "
                              f"(LORA_LAB_MAX_RUNS_PER_SESSION) and has {len(mine)}; delete runs you no longer need "
                              f"(section 5, after downloading what you want to keep) to make room for {n} more")
        active = sum(j.status in ("queued", "running") for j in mine)
        if active + n > lim.max_queued_per_session:
            raise ConfigError(f"this session may have at most {lim.max_queued_per_session} runs queued or running "
                              f"at once (LORA_LAB_MAX_QUEUED_PER_SESSION) and has {active}; {n} more would pass "
                              "it: wait for some to finish, or stop them")

    def prune_checkpoints(self, job: Job) -> None:
        """Keep the checkpoints of ``job``'s session under LORA_LAB_MAX_CHECKPOINT_MB (records.prune_checkpoints)."""
        with self.lock:
            owned = sorted((j for j in self.jobs.values() if j.owner == job.owner), key=lambda j: j.created)
        prune_checkpoints(owned, job)

    def connection_key(self, connection: str) -> str:
        """The owner key of an API connection that did not present one (kept in memory only)."""
        with self.lock:
            key = self._connection_keys.pop(connection, None) or owners.new_key()
            self._connection_keys[connection] = key
            while len(self._connection_keys) > CONNECTIONS_KEPT:
                self._connection_keys.popitem(last=False)
            return key

    def finished_on(self, model: str, precision: str) -> list[dict]:
        """Records of the runs that completed or stopped on ``model`` in ``precision``: the budget's history."""
        with self.lock:
            return [j.record() for j in self.jobs.values() if j.config.model == model
                    and j.status in ("completed", "stopped") and j.device.endswith(precision)]
