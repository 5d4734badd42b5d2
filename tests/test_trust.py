"""Many users, faults and bad input against the launched app (conftest.shared_app: ``python app.py --model micro``).

Faults are real events inside the server: training raises out-of-memory or an exception, or its loss
turns NaN, at a chosen step (``LORA_LAB_FAULT``, read from the server's environment), a client
disconnects mid-run, and the server is killed with SIGKILL mid-run.
"""

import json
import re
import threading
import time
import urllib.request

import pytest
from conftest import final_row, lab_client

from lora_demo import adapters
from lora_demo.analysis.evaluate import translate_both
from lora_demo.core.inject import apply_lora, remove_lora

GENERIC = "has not enabled verbose error reporting"   # what a client sees for an unhandled exception
SHORT = dict(steps=4, train_size=16, bleu_size=0)


@pytest.fixture(scope="module")
def app(shared_app):
    return shared_app   # conftest: LORA_LAB_FAULT=FAULTS, LORA_LAB_MAX_RUNS_PER_SESSION=4, fp32


def client(app):
    return lab_client(app[0])


@pytest.mark.slow
def test_five_clients_at_once_each_get_their_own_runs_and_translations(app, bundled_tiny):
    text = "The session is resumed.\nI would like to thank the Commissioner."
    results, errors, positions = {}, [], []

    def user(i):
        try:
            c, side = client(app), client(app)   # side: requests while c's own job streams (no overlap on c)
            # one shape for all (seeds differ): after the first run, the others reuse its compiled step
            job = c.submit(rank=4, targets=["q", "v"], seed=i, lr=0.01, api_name="/train", **SHORT)
            translated_meanwhile = None
            for update in job:
                positions.append(update["queue_position"])
                if translated_meanwhile is None:   # while this run waits or trains, others are training
                    translated_meanwhile = side.predict(text=text, api_name="/translate")
            final = job.result()
            results[i] = {"final": final, "runs": c.predict(api_name="/runs"),
                          "meanwhile": translated_meanwhile,
                          "after": c.predict(text=text, api_name="/translate")}
        except Exception as exc:   # collected: every request must succeed
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=user, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert len(results) == 5 and max(positions) >= 2, "the runs should have queued behind each other"
    for i, r in results.items():
        assert r["final"]["status"] == "completed", r["final"]
        assert [row["run_id"] for row in r["runs"]] == [r["final"]["run_id"]]      # its own run only
        assert r["meanwhile"]["base"] and len(r["meanwhile"]["lora"]) == 2
        assert r["after"]["run_id"] == r["final"]["run_id"]
        # what this client's own adapter gives, computed here from the files the server wrote
        adapter = adapters.read_adapter(app[1] / "runs" / r["final"]["run_id"])
        apply_lora(bundled_tiny.model, adapter.config)
        adapters.assign_state(bundled_tiny.model, adapter.state)
        try:
            base, lora = translate_both(bundled_tiny.model, bundled_tiny.tokenizer, text.splitlines())
        finally:
            remove_lora(bundled_tiny.model)
        assert r["after"]["base"] == base and r["after"]["lora"] == lora, i
    # the shared base weights were never modified: every base column is the same
    assert len({tuple(r["after"]["base"]) for r in results.values()}) == 1


@pytest.mark.parametrize("seed, reason, hint", [
    (101, "out of memory at step 2", "lower the batch size"),
    (102, "the loss became NaN at step 2", "lower the learning rate"),
    (103, "RuntimeError: injected failure at step 2", "report it"),
])
def test_faults_inside_training_end_the_run_as_failed_and_the_app_keeps_serving(app, seed, reason, hint):
    c = client(app)
    final = c.submit(seed=seed, api_name="/train", **SHORT).result()
    assert final["status"] == "failed" and reason in final["error"] and hint in final["error"], final
    assert [s for s, _ in final["losses"]] == [1]            # the step before the fault is kept
    row = next(r for r in c.predict(api_name="/runs") if r["run_id"] == final["run_id"])
    assert row["status"] == "failed"
    nxt = c.submit(seed=1, api_name="/train", **SHORT).result()   # the next run starts cleanly
    assert nxt["status"] == "completed" and c.predict(text="Hello.", api_name="/translate")["lora"]


def test_stop_takes_effect_within_one_step_and_the_run_is_kept(app):
    c, stopper = client(app), client(app)   # the stop goes through a second connection, with the owner key
    job = c.submit(steps=2000, train_size=32, bleu_size=0, api_name="/train")
    answer = None
    for update in job:
        if answer is None and update["step"] >= 2:
            answer = stopper.predict(run_id=update["run_id"], owner_key=update["owner_key"], api_name="/stop")
    assert update["status"] == "stopped"
    final = final_row(app[0], update["run_id"])
    assert final["status"] == "stopped" and final["steps_done"] <= answer["step_at_request"] + 1, (final, answer)
    assert (app[1] / "runs" / final["run_id"] / "adapter_model.safetensors").is_file()


def test_a_dropped_client_does_not_stop_its_run(app):
    c = client(app)
    job = c.submit(steps=40, train_size=16, bleu_size=0, api_name="/train")
    run_id = next(iter(job))["run_id"]
    job.cancel()                    # the client goes away mid-run
    c.close()
    watcher = client(app)
    deadline = time.time() + 300
    while time.time() < deadline:
        row = next(r for r in watcher.predict(all_runs=True, api_name="/runs") if r["run_id"] == run_id)
        if row["status"] not in ("queued", "running"):
            break
        time.sleep(1)
    assert row["status"] == "completed" and row["steps_done"] == 40, row
    run_dir = app[1] / "runs" / run_id
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "metrics.json").is_file()


@pytest.mark.slow
def test_the_run_limit_per_session_refuses_with_advice_and_delete_makes_room(app):
    c, other = client(app), client(app)
    ids = [c.submit(seed=1, steps=1, train_size=16, bleu_size=0, api_name="/train").result()["run_id"]
           for _ in range(4)]
    with pytest.raises(Exception, match="keeps at most 4 runs"):
        c.predict(steps=1, api_name="/train")
    with pytest.raises(Exception, match="keeps at most 4 runs"):
        c.predict(ranks="1,2", steps=1, api_name="/sweep")
    with pytest.raises(Exception, match="another session"):
        other.predict(run_id=ids[0], api_name="/delete_run")
    assert c.predict(run_id=ids[0], api_name="/delete_run") == {"deleted": ids[0]}
    assert not (app[1] / "runs" / ids[0]).exists()
    assert [r["run_id"] for r in c.predict(api_name="/runs")] == ids[1:]
    assert c.submit(seed=1, steps=1, train_size=16, bleu_size=0, api_name="/train").result()["status"] == "completed"


BAD = [  # (endpoint, arguments, message)
    ("/params", dict(rank=0), "rank must be between 1 and"),
    ("/params", dict(rank=-3), "rank must be between 1 and"),
    ("/params", dict(rank=10**9), "rank must be between 1 and"),
    ("/params", dict(rank=2.5), "rank must be a whole number"),
    ("/params", dict(rank="eight"), "rank must be a whole number"),
    ("/params", dict(alpha=0), "alpha must be greater than 0"),
    ("/params", dict(alpha=1e9), "alpha must be greater than 0 and at most"),
    ("/params", dict(targets=[]), "choose at least one target module"),
    ("/params", dict(targets=["q", "attn"]), "unknown target module(s) attn"),
    ("/params", dict(first_layer=0, last_layer=99), "outside the"),
    ("/params", dict(first_layer=3, last_layer=1), "is empty"),
    ("/train", dict(lr=0), "learning rate must be greater than 0"),
    ("/train", dict(lr=5.0), "learning rate must be greater than 0 and at most 1"),
    ("/train", dict(steps=10**6), "steps must be between 1 and 2000"),
    ("/train", dict(batch_size=10**4), "batch size must be between 1 and 64"),
    ("/train", dict(optimizer="sgd"), "optimizer must be one of"),
    ("/sweep", dict(ranks="4,x"), "sweep rank"),
    ("/translate", dict(text="\x00\x01 \t \n"), "at least one English sentence"),
    ("/translate", dict(text="Hi.", scale=7), "LoRA scale must be between 0 and 2"),
    ("/translate", dict(text="Hi.", run_id="no-such-run"), "no run"),
    ("/stop", dict(run_id="no-such-run"), "no run or sweep"),
    ("/delete_run", dict(run_id="no-such-run"), "no run"),
]


def test_bad_input_through_the_api_gets_a_clear_message(app):
    import re

    c = client(app)
    for endpoint, kwargs, message in BAD:
        with pytest.raises(Exception, match=re.escape(message)):
            c.predict(api_name=endpoint, **kwargs)
    assert c.predict(rank=8, api_name="/params")["trainable"] > 0   # and it still works


def test_odd_text_is_cleaned_cut_and_translated(app):
    c = client(app)
    out = c.predict(text="Hello\x07 world.\n\n  Ünïcödé ✓ 🙂 Привет 你好 مرحبا\n" + "word " * 1000,
                    api_name="/translate")
    assert out["english"][0] == "Hello world." and "🙂" in out["english"][1] and "你好" in out["english"][1]
    assert len(out["base"]) == len(out["lora"]) == 3
    assert any("control characters" in n for n in out["notices"])
    assert any("cut to 2000 characters" in n for n in out["notices"])


def _losses(tmp_path, run_id) -> dict[int, float]:
    """A run's losses by step, from the record the server wrote."""
    return {s: v for s, v, _ in json.loads((tmp_path / "runs" / run_id / "metrics.json").read_text())["losses"]}


# -- property-based checks of the live endpoints ------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_demo.core.config import MODULES, ConfigError, LoraConfig, clean_sentences  # noqa: E402
from lora_demo.core.params import preview  # noqa: E402

LIVE = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@LIVE
@given(rank=st.one_of(st.integers(-5, 300), st.floats(-2, 80, allow_nan=False)),
       targets=st.lists(st.one_of(st.sampled_from(MODULES), st.text(min_size=1, max_size=4)), max_size=4),
       side=st.sampled_from(["both", "encoder", "decoder"]), first=st.integers(-1, 4), last=st.integers(-1, 4))
def test_params_endpoint_is_exact_or_explains(app, rank, targets, side, first, last):
    c = client(app)
    try:
        layers = (first, 2 if last == -1 else last)        # the bundled tiny has blocks 0-2
        want = preview("micro", LoraConfig(rank=rank, targets=targets, side=side,
                                          layers=None if layers == (0, 2) else layers))
    except ConfigError as exc:
        want = exc
    try:
        out = c.predict(rank=rank, targets=targets, side=side, first_layer=first, last_layer=last, api_name="/params")
    except Exception as exc:
        assert GENERIC not in str(exc) and str(exc).strip(), exc
        return
    assert not isinstance(want, ConfigError), (want, out)
    assert (out["trainable"], out["total"]) == (want.trainable, want.total)


@LIVE
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=600))
def test_translate_endpoint_answers_every_text_or_explains(app, text):
    c = client(app)
    try:
        out = c.predict(text=text, api_name="/translate")
    except Exception as exc:
        assert "at least one English sentence" in str(exc), exc
        return
    assert out["english"] == clean_sentences(text)[0]
    assert len(out["base"]) == len(out["lora"]) == len(out["english"])


# -- last: the server is killed and started again ---------------------------------

@pytest.mark.slow
def test_a_server_killed_mid_run_keeps_every_record_and_the_run_resumes_with_the_same_losses(app):
    """SIGKILL mid-run, then the same app started again on the same runs directory (the suite's second and
    last launch). Every run recorded before is listed again, each ended; the killed run is interrupted with its
    checkpoints (the session's checkpoint limit pruned the oldest, with a notice); /resume continues it from the
    newest, and its losses from there on equal those of the same run trained without a break (float32, to
    1e-5); and the header states the default run's cost from the recorded runs, not a promise."""
    setup = dict(steps=400, train_size=64, bleu_size=0, seed=4, checkpoint_every=3, eval_every=5)
    c = client(app)   # conftest: LORA_LAB_MAX_CHECKPOINT_MB=1; a micro r=8 checkpoint is ~0.4 MB: the fourth goes over
    before = {r["run_id"] for r in c.predict(all_runs=True, api_name="/runs")}
    job = c.submit(**setup, api_name="/train")
    for update in job:
        if update["step"] >= 14:
            run_id, key = update["run_id"], update["owner_key"]
            break
    app.proc.kill()                   # SIGKILL: no chance to tidy up
    app.restart()
    c = client(app)
    after = c.predict(all_runs=True, api_name="/runs")
    assert before and before <= {r["run_id"] for r in after}
    assert all(r["status"] in ("completed", "stopped", "failed", "interrupted", "imported") for r in after)
    page = urllib.request.urlopen(app[0], timeout=30).read().decode()
    assert re.search(r"The default run (\(\d+ steps\) should take about \d+ s|took \d+ s)", page), \
        re.findall(r"The default run[^.]*", page)
    row = next(r for r in c.predict(owner_key=key, api_name="/runs") if r["run_id"] == run_id)
    assert row["status"] == "interrupted" and row["steps_done"] >= 14, row
    kept = row["checkpoint_steps"]
    assert kept and kept[-1] >= 12 and 3 not in kept, kept          # the oldest went first
    assert any("removed" in n and "LORA_LAB_MAX_CHECKPOINT_MB" in n for n in row["notices"]), row["notices"]
    assert f"checkpoint at step {kept[-1]}" in row["error"]
    with pytest.raises(Exception, match="resume to more steps than that"):
        c.predict(run_id=run_id, steps=kept[-1], owner_key=key, api_name="/resume")
    # The same run never interrupted, for comparison. It trains first in this process, as the killed run
    # did in its own: its first loss is an eager forward pass, its updates a fresh trace. A run reusing an earlier
    # run's traced step takes its first step in the graph, whose fused kernels round differently in
    # float32 (a 1.6e-5 loss difference by step 24 on an AVX512-BF16 EPYC): that is not resume's doing.
    # No checkpoints of its own: under the session's 1 MB limit they would prune the killed run's.
    whole = None
    # Both run all 400 planned steps: the default learning rate falls linearly to 0 at the planned last step, so
    # only a run planned as long has the same rates.
    for whole in c.submit(**{**setup, "checkpoint_every": 0}, owner_key=key, api_name="/train"):
        pass
    # resume to its planned end (every resumed step is traced, as the uninterrupted run's are after step 1)
    last = None
    for last in c.submit(run_id=run_id, owner_key=key, api_name="/resume"):
        pass
    assert last["status"] == "completed" and last["step"] == 400, last
    assert last["resumes"] == [{"from_step": kept[-1], "was": "interrupted", "steps": 400}]
    with pytest.raises(Exception, match="no run"):
        c.predict(run_id="nope", owner_key=key, api_name="/resume")
    resumed, expected = _losses(app[1], run_id), _losses(app[1], whole["run_id"])
    assert sorted(resumed) == list(range(1, 401))
    after = range(kept[-1] + 1, 401)
    assert max(abs(resumed[s] - expected[s]) for s in after) < 1e-5, (resumed, expected)
    assert last["summary"]["final_heldout_loss"] == pytest.approx(whole["summary"]["final_heldout_loss"], abs=1e-5)
