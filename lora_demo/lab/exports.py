"""Files made for download: a run's adapter zip and merged checkpoint (inside the run's own directory,
so a deleted run takes them with it), and reports and tables made on request (in one folder of this
server's, pruned after an hour and removed when the process exits)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path

from lora_demo import adapters
from lora_demo.core.config import ConfigError
from lora_demo.lab.records import Job
from lora_demo.lab.serving import Serving

EXPORT_TTL_S = 3600   # a CSV or report file is kept this long (Gradio serves its own copy of it)


class Exports:
    def __init__(self):
        self._dir: Path | None = None

    def path(self, name: str) -> Path:
        """A fresh path for a file the user asked for; files older than EXPORT_TTL_S are removed first."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lora-lab-exports-"))
            atexit.register(shutil.rmtree, self._dir, True)
        now = time.time()
        for old in self._dir.iterdir():
            if now - old.stat().st_mtime > EXPORT_TTL_S:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self._dir)) / name

    def report(self, jobs: list[Job]) -> Path:
        """The self-contained HTML report of ``jobs`` (present/report.py)."""
        from lora_demo.present import report

        if not jobs:
            raise ConfigError("no runs to report yet: train one first")
        return report.write([j.dir for j in jobs], self.path("lora_lab_report.html"))


def _run_exports(job: Job) -> Path:
    out = job.dir / "exports"
    out.mkdir(exist_ok=True)
    return out


def adapter_zip(job: Job) -> Path:
    """A zip of the run's PEFT adapter directory (upload it back to import it)."""
    if not job.config.lora.adapter:
        raise ConfigError(f"run {job.id} is full fine-tuning: there is no adapter, only the whole model. "
                          "Download the merged checkpoint instead")
    return adapters.zip_dir(job.dir, _run_exports(job) / f"lora-lab-adapter-{job.id}.zip",
                            only=(adapters.CONFIG_FILE, adapters.WEIGHTS_FILE))


def merged_zip(job: Job, state: dict, serving: Serving, base_model: str) -> Path:
    """A zip of a full TF checkpoint with the run's update merged in (``save_pretrained``)."""
    out = _run_exports(job) / f"lora-lab-merged-{job.id}"
    shutil.rmtree(out, ignore_errors=True)
    serving.export_merged(job.config.lora, state, out, source={"run_id": job.id, "base_model": base_model})
    try:
        return adapters.zip_dir(out, out.with_suffix(".zip"), compress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
