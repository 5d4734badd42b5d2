"""Run records: a real run on tiny is recorded on disk, read back exactly, and survives a crash."""

import json

import pytest

from lora_demo import data
from lora_demo.lab import owners
from lora_demo.lab.exports import EXPORT_TTL_S
from lora_demo.core.config import ConfigError, LoraConfig, RunConfig, TrainConfig, expand_sweep
from lora_demo.core.events import change_text, confidence_text, first_choice_text, loops_text, words_text
from lora_demo.core.inject import remove_lora
from lora_demo.lab import Lab
from lora_demo.lab.execute import execute
from lora_demo.lab.records import Job, RECORD


def _pairs(split, n, dataset="europarl"):
    return data.pairs_for(split, n, dataset, source="bundled")


def _config(rank=2, steps=6, bleu=8):
    return RunConfig(model="micro", lora=LoraConfig(rank=rank, targets=("q", "v")),
                     train=TrainConfig(steps=steps, batch_size=4, train_size=16, eval_every=3, eval_size=8,
                                       bleu_size=bleu, lr=5e-3))


@pytest.fixture(scope="module")
def recorded(bundled_tiny, tmp_path_factory):
    """One real run on the bundled tiny model, executed the way the app and the CLI execute runs."""
    job = Job.new(_config(), "s1", tmp_path_factory.mktemp("runs"))
    execute(job, bundled_tiny.model, bundled_tiny.tokenizer, _pairs, {})
    remove_lora(bundled_tiny.model)
    return job


def test_a_run_records_everything(recorded):
    rec = recorded.record()
    assert rec["status"] == "completed" and rec["owner"] == owners.digest("s1") and "s1" not in json.dumps(rec)
    assert [s for s, _, _ in rec["losses"]] == list(range(1, 7))
    assert all(t2 > t1 for (_, _, t1), (_, _, t2) in zip(rec["losses"], rec["losses"][1:]))  # tokens grow
    assert [s for s, _ in rec["val_losses"]] == [0, 3, 6]
    assert rec["params"]["trainable"] > 0 and rec["data"]["origin"] == "bundled"
    s = rec["summary"]
    assert s["first_loss_s"] > 0 and s["mean_step_s"] > 0 and s["tokens_per_s"] > 0
    assert rec["memory"]["peak_rss_mb"] > 100 and rec["memory"]["gpu_peak_mb"] is None
    q = rec["quality"]
    assert q["n"] == 8 and q["split"] == data.LESSONS[recorded.config.train.data].test_name
    # the held-out fall and the rise on what the base knew, each with its paired bootstrap over sentences
    assert q["heldout_change"]["change"] == pytest.approx(s["final_heldout_loss"] - s["base_heldout_loss"], abs=0.02)
    assert q["forget_change"]["change"] == pytest.approx(s["final_val_loss"] - s["base_val_loss"], abs=0.02)
    assert rec["finished"] > rec["created"]
    for side in ("base", "lora"):
        assert 0 <= q[side]["bleu"] <= 100 and 0 <= q[side]["chrf"] <= 100
        assert q[side]["bleu_signature"].startswith("nrefs:1")
        assert q[side]["loops"] in range(0, 9)   # greedy translations of the 8 that fell into a repetition loop
    assert loops_text(q) == f"; repetition loops base {q['base']['loops']} -> LoRA {q['lora']['loops']} of 8"
    # the paired bootstrap of the same 8 outputs: its whole-slice change is the difference of the scores above
    c = q["change"]
    assert (c["samples"], c["sentences"]) == (1000, 8)
    for key in ("bleu", "chrf"):
        assert c[key]["change"] == pytest.approx(q["lora"][key] - q["base"][key])
        assert c[key]["low"] <= c[key]["high"] and 0 <= c[key]["better"] <= 1
        assert c[key]["real"] == (c[key]["low"] > 0 or c[key]["high"] < 0)
    assert f"chrF {c['chrf']['change']:+.2f} (95% of resampled slices" in change_text(q)
    # the words whose count changed most in the same 8 outputs, each a real change, with the references' count
    words = q["words"]
    assert len(words) <= 5 and all(w["lora"] != w["base"] and w["reference"] >= 0 for w in words)
    changes = [abs(w["lora"] - w["base"]) for w in words]
    assert changes == sorted(changes, reverse=True)
    if words:
        assert f"\u201c{words[0]['word']}\u201d {words[0]['base']} -> {words[0]['lora']}" in words_text(q)
    # the base's held-out loss at its best softmax temperature: the same held-out pairs as the run's curve
    conf = q["confidence"]
    assert conf["base"]["loss"] == pytest.approx(s["base_heldout_loss"], abs=0.01)
    assert conf["lora"]["loss"] == pytest.approx(s["final_heldout_loss"], abs=0.01)
    assert all(conf[m]["best_loss"] <= conf[m]["loss"] for m in ("base", "lora"))
    text = confidence_text(q, s)
    assert f"(T = {conf['base']['temperature']:.2f}) changes its held-out loss by" in text
    assert f"{conf['lora']['best_loss'] - conf['base']['best_loss']:+.3f} with each model at its best" in text
    # the share of held-out target tokens ranked first, base and trained, from the same held-out pairs
    f = q["first_choice"]
    assert f["sentences"] == s["heldout_pairs"] and f["tokens"] == conf["base"]["tokens"]
    assert 0 < f["base"] < 1 and 0 < f["lora"] < 1 and f["change"] == pytest.approx(f["lora"] - f["base"])
    assert f["low"] <= f["change"] <= f["high"] and f["real"] == (f["low"] > 0 or f["high"] < 0)
    assert f"base {100 * f['base']:.2f}% -> LoRA {100 * f['lora']:.2f}% of {f['tokens']:,} tokens" in first_choice_text(q)
    assert rec["adapter"]["bytes"] == (recorded.dir / "adapter_model.safetensors").stat().st_size


def test_records_round_trip_through_disk(recorded):
    again = Job.load(recorded.dir)
    assert again.record() == json.loads(json.dumps(recorded.record(), default=float))
    assert again.done.is_set()


def test_a_killed_run_comes_back_as_interrupted_with_its_steps(recorded, tmp_path):
    """Simulate a server killed mid-run: the record still says running, events.jsonl has 4 steps."""
    job = Job.new(_config(steps=50), "s2", tmp_path)
    job.dir.mkdir(parents=True)
    job.status = "running"
    job.save()
    events = (recorded.dir / "events.jsonl").read_text().splitlines()
    kept = [e for e in events if json.loads(e)["event"] in ("RunStarted", "StepLogged")][:5]
    (job.dir / "events.jsonl").write_text("\n".join(kept) + "\n" + '{"event": "StepLo')  # cut mid-line
    back = Job.load(job.dir)
    assert back.status == "interrupted" and "server stopped" in back.error
    assert [s for s, _, _ in back.losses] == [1, 2, 3, 4]
    assert json.loads((job.dir / RECORD).read_text())["status"] == "interrupted"


def test_the_lab_lists_recorded_runs_after_a_restart(recorded, bundled_tiny, tmp_path):
    import shutil

    shutil.copytree(recorded.dir, tmp_path / recorded.id)
    # a record from before owner keys kept the browser's session id itself; it is kept as a digest now
    old = shutil.copytree(recorded.dir, tmp_path / "0-old-format")
    rec = json.loads((old / RECORD).read_text())
    rec.update(run_id="0-old-format", session="browser-session-id")
    del rec["owner"]
    (old / RECORD).write_text(json.dumps(rec))
    lab = Lab(bundled_tiny, runs_dir=tmp_path, data_source="bundled")
    assert [j.id for j in lab.runs("s1")] == [recorded.id] and lab.runs("other") == []
    assert [j.id for j in lab.runs("browser-session-id")] == ["0-old-format"]
    assert "browser-session-id" not in (old / RECORD).read_text()
    assert [j.id for j in lab.runs(None)] == ["0-old-format", recorded.id]
    base, lora = lab.translate(["The session is resumed."], recorded.id, scale=0.0, session="s1")
    assert base == lora  # adapter loaded from disk; scale 0 is the base exactly
    with pytest.raises(ValueError, match="another session"):
        lab.translate(["Hi."], recorded.id, session="s9")


def test_merged_translation_matches_the_unmerged_adapter_and_restores_the_kernels(recorded, bundled_tiny, tmp_path):
    import shutil

    import numpy as np

    from lora_demo import adapters
    from lora_demo.analysis.evaluate import translate_both
    from lora_demo.core.inject import apply_lora

    shutil.copytree(recorded.dir, tmp_path / recorded.id)
    lab = Lab(bundled_tiny, runs_dir=tmp_path, data_source="bundled")
    before = [v.numpy().copy() for v in lab.translator.weights]
    sentences = ["The session is resumed.", "I would like to thank the Commissioner."]
    # a clearly visible adapter: the recorded one at scale 2
    base, merged = lab.translate(sentences, recorded.id, scale=2.0, session="s1")
    for v, b in zip(lab.translator.weights, before):
        assert np.array_equal(v.numpy(), b), v.name
    adapter = adapters.read_adapter(recorded.dir)
    try:
        apply_lora(bundled_tiny.model, adapters.check_fits(adapter, bundled_tiny.model))
        adapters.assign_state(bundled_tiny.model, adapter.state)
        base_u, lora_u = translate_both(bundled_tiny.model, bundled_tiny.tokenizer, sentences, scale=2.0)
    finally:
        remove_lora(bundled_tiny.model)
    assert base == base_u and merged == lora_u


def test_every_column_comes_from_one_decode_equal_to_merged_decodes(recorded, bundled_tiny, tmp_path):
    """The translate box's base and LoRA columns come from one batched decode (core.rowsplit): the
    sentences twice over, the second copy on W + ΔW. Six sentences are decoded as one batch of 32 rows
    (their bucket of 16, twice); the German equals a base decode and a merged decode, word for word.
    Then three updates beside the base in one batch of 64 rows, one of them with the encoder's part
    switched off (so some layers carry W in its slot), each equal to its merged decode; the limits of a
    request with runs beside (test_app checks one through the API), and nothing left behind."""
    import shutil

    from lora_demo.analysis import anatomy
    from lora_demo.analysis.evaluate import translate
    from lora_demo.core import rowsplit
    from lora_demo.core.state import state_of
    import tensorflow as tf

    shutil.copytree(recorded.dir, tmp_path / recorded.id)
    lab = Lab(bundled_tiny, runs_dir=tmp_path, data_source="bundled")
    n_weights = len(lab.translator.weights)
    sentences = [p.en for p in _pairs("test", 6, "news").items]
    base, lora = lab.translate(sentences, recorded.id, scale=2.0, session="s1")
    assert {k[1] for k in state_of(lab.translator).generate} == {32}   # one decode, both halves
    job = lab.jobs[recorded.id]
    with lab.serving.use() as model:
        assert base == translate(model, bundled_tiny.tokenizer, sentences)
    with lab.serving.use(job.config.lora, lab.adapter_of(job), 2.0) as model:
        assert lora == translate(model, bundled_tiny.tokenizer, sentences)
    assert sum(b != m for b, m in zip(base, lora)) >= 3, list(zip(base, lora))   # the adapter shows

    cfg, state = job.config.lora, lab.adapter_of(job)
    decoder_only = anatomy.switch_off(state, **anatomy.keep_spec(["decoder"], "all", anatomy.COLUMNS))
    again, columns = lab.serving.translate_many(sentences, [(cfg, state, 2.0), (cfg, decoder_only, 1.0),
                                                            (cfg, state, 0.5)])
    assert {k[1] for k in state_of(lab.translator).generate} == {16, 32, 64}   # four copies: one batch of 64
    assert again == base and columns[0] == lora
    for column, (part, scale) in zip(columns[1:], ((decoder_only, 1.0), (state, 0.5))):
        with lab.serving.use(cfg, part, scale) as model:
            assert column == translate(model, bundled_tiny.tokenizer, sentences)
    assert columns[1] != lora and columns[2] != lora
    with pytest.raises(ConfigError, match="at most 4 runs side by side, got 5"):   # refused before decoding
        lab.translate_request("Hello.", recorded.id, 1.0, "s1", beside=["a", "b", "c", "d", "a"])
    with pytest.raises(ConfigError, match="no run 'nope'"):
        lab.translate_request("Hello.", recorded.id, 1.0, "s1", beside=["nope"])
    # nothing stays behind: no second kernel on, none counted as a weight
    layers = lab.serving.split_layers
    assert not any(rowsplit.holds(layer) for layer in layers.values())
    assert len(lab.translator.weights) == n_weights
    # three runs, then one: the slots the second load does not use give their memory back
    two = {path: layer.kernel for path, layer in list(layers.items())[:2]}
    rowsplit.load(layers, [two, two, two])
    rowsplit.load(layers, [two])
    assert [[int(tf.size(slot)) > 0 for slot in layers[path]._slots] for path in two] == [[True] + [False] * 3] * 2
    assert [path for path, layer in layers.items() if rowsplit.holds(layer)] == list(two)
    rowsplit.clear(layers)
    assert not any(rowsplit.holds(layer) for layer in layers.values())


def test_download_import_and_merged_export_through_the_lab(recorded, bundled_tiny, tmp_path):
    """A run's adapter zip imports into another session as a run that translates identically; a bad
    upload changes nothing; the merged export of the imported run loads and matches it."""
    import shutil
    import zipfile

    from transformers import TFAutoModelForSeq2SeqLM

    from lora_demo.adapters import AdapterError
    from lora_demo.analysis.evaluate import translate

    runs = tmp_path / "runs"
    shutil.copytree(recorded.dir, runs / recorded.id)
    lab = Lab(bundled_tiny, runs_dir=runs, data_source="bundled")
    zipped = lab.adapter_zip(recorded.id, session="s1")
    assert zipped.parent.parent == runs / recorded.id   # built inside the run's own directory
    with pytest.raises(ValueError, match="another session"):
        lab.adapter_zip(recorded.id, session="s9")

    listing = sorted(p.name for p in runs.iterdir())
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../adapter_config.json", "{}")
    with pytest.raises(AdapterError, match="outside the archive"):
        lab.import_adapter([bad], session="s9")
    assert sorted(p.name for p in runs.iterdir()) == listing and len(lab.jobs) == 1

    job = lab.import_adapter([zipped], session="s9", name=zipped.name)
    assert job.status == "imported" and job.config.lora == recorded.config.lora
    assert job.params["trainable"] == recorded.params["trainable"]
    assert Job.load(job.dir).status == "imported"      # a restart keeps it as it is
    sentences = ["The session is resumed.", "I would like to thank the Commissioner."]
    _, theirs = lab.translate(sentences, job.id, scale=2.0, session="s9")
    _, ours = lab.translate(sentences, recorded.id, scale=2.0, session="s1")
    assert theirs == ours

    merged_zip = lab.export_merged(job.id, session="s9")
    with zipfile.ZipFile(merged_zip) as zf:
        zf.extractall(tmp_path / "unzipped")
    merged = TFAutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "unzipped" / merged_zip.stem))
    _, at_one = lab.translate(sentences, job.id, scale=1.0, session="s9")
    assert translate(merged, bundled_tiny.tokenizer, sentences, compiled=False) == at_one


@pytest.mark.slow
def test_two_training_slots_train_two_jobs_at_once_on_separate_models(bundled_tiny, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("LORA_LAB_TRAIN_SLOTS", "2")
    lab = Lab(bundled_tiny, runs_dir=tmp_path, data_source="bundled")
    assert len(lab.trainers) == 2 and lab.trainers[1] is not bundled_tiny.model
    jobs = [lab.submit(_config(steps=2000, bleu=0), f"s{i}") for i in range(2)]
    deadline = time.time() + 180
    while time.time() < deadline and not all(j.losses for j in jobs):
        time.sleep(0.2)
    assert all(j.losses and j.status == "running" for j in jobs), [(j.status, j.error) for j in jobs]   # both at once
    assert lab.queue.position(jobs[1]) == 0
    for j in jobs:
        lab.stop(j.id)
    for j in jobs:
        assert j.done.wait(120) and j.status == "stopped"


@pytest.mark.slow
def test_runs_translate_samples_and_bleu_through_one_compiled_translator(bundled_tiny, tmp_path):
    """Samples and BLEU go through the lab's translator with the adapter merged in: a second run of
    another rank compiles nothing new (the training model's fresh LoRA layers would, every run, and
    XLA keeps each program: that cost memory per run)."""
    from dataclasses import replace
    
    from lora_demo.analysis.evaluate import translate
    from lora_demo.core.state import state_of
    from lora_demo.training.samples import SAMPLE_TOKENS

    lab = Lab(bundled_tiny, runs_dir=tmp_path, data_source="bundled")
    trainer_cache = set(state_of(lab.trainers[0]).generate)
    sentences = ("The session is resumed.", "I thank the Commissioner.")
    compiled = []
    for rank in (2, 3):
        cfg = _config(rank=rank, steps=3, bleu=4)
        job = lab.submit(replace(cfg, train=replace(cfg.train, samples=sentences)), "s1")
        assert job.done.wait(180) and job.status == "completed", job.error
        compiled.append(set(state_of(lab.translator).generate))
        assert [s for s, _ in job.samples] == [0, 3] and job.quality["n"] == 4
        with lab.serving.use(job.config.lora, lab.adapter_of(job)) as merged:
            assert job.samples[-1][1] == translate(merged, bundled_tiny.tokenizer, list(sentences),
                                                   max_new_tokens=SAMPLE_TOKENS)
    assert compiled[0] and compiled[1] == compiled[0]
    assert set(state_of(lab.trainers[0]).generate) == trainer_cache


@pytest.mark.slow
def test_a_session_may_queue_only_so_many_runs_and_exports_are_tidied(bundled_tiny, tmp_path, monkeypatch):
    """LORA_LAB_MAX_QUEUED_PER_SESSION refuses a sweep that would pass it, before queuing any of it; other
    sessions are not affected. Downloads made on request live in one folder whose old files are removed."""
    import os
    import time

    from lora_demo.core.config import ConfigError

    monkeypatch.setenv("LORA_LAB_MAX_QUEUED_PER_SESSION", "2")
    lab = Lab(bundled_tiny, runs_dir=tmp_path, data_source="bundled")
    with pytest.raises(ConfigError, match="at most 2 runs queued or running at once"):
        lab.submit_sweep(expand_sweep(_config(steps=2, bleu=0), [1, 2, 3]), "s1")
    assert lab.jobs == {}
    jobs = lab.submit_sweep(expand_sweep(_config(steps=2, bleu=0), [1, 2]), "s1")
    with pytest.raises(ConfigError, match="LORA_LAB_MAX_QUEUED_PER_SESSION"):
        lab.submit(_config(steps=2, bleu=0), "s1")
    for j in jobs:
        assert j.done.wait(180) and j.status == "completed", j.error
    assert lab.submit(_config(steps=2, bleu=0), "s1").done.wait(180)   # room again once they have ended

    # A run waiting behind another is told how long: the running run's ETA plus the predicted time of the
    # runs ahead of it (step time from the finished runs above), never a guess.
    first, second = lab.submit(_config(steps=2000, bleu=0), "s2"), lab.submit(_config(steps=50, bleu=0), "s2")
    deadline = time.time() + 120
    while time.time() < deadline and first.eta_s() is None:
        time.sleep(0.2)
    state = lab.status(second)    # the first is running: its ETA at the pace of its last steps
    assert state["queue_position"] == 1 and 0 < state["wait_s"] <= first.eta_s() * 1.5 + 1, state["wait_s"]
    from lora_demo.app.common import status_line
    assert "s to wait" in status_line(lab, state) or "min to wait" in status_line(lab, state)
    for j in (first, second):
        lab.stop(j.id)
    assert first.done.wait(120) and second.done.wait(120)

    old = lab.export_path("a.csv")
    old.write_text("x")
    past = time.time() - EXPORT_TTL_S - 1
    os.utime(old.parent, (past, past))
    new = lab.export_path("b.csv")
    assert not old.parent.exists() and new.parent.parent == old.parent.parent and new.parent.exists()
    with pytest.raises(ConfigError, match="no runs to report"):
        lab.report([])
