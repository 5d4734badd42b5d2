"""The app launched for real on a local port (conftest.shared_app: `python app.py --model micro`), driven by
gradio_client."""

import os

import pytest
from conftest import final_row, lab_client

from lora_demo import data
from lora_demo.analysis.evaluate import MAX_SOURCE_TOKENS
from lora_demo.core.config import LoraConfig
from lora_demo.core.params import preview


@pytest.fixture(scope="module")
def app(shared_app):
    return shared_app   # conftest: micro


@pytest.fixture
def client(app):
    return lab_client(app[0])


def test_params_endpoint_matches_the_arithmetic(client):
    out = client.predict(rank=4, alpha=8, targets=["q", "k", "v"], side="decoder", first_layer=1, last_layer=2,
                         api_name="/params")
    want = preview("micro", LoraConfig(rank=4, alpha=8, targets=("q", "k", "v"), side="decoder", layers=(1, 2)))
    assert (out["total"], out["trainable"], out["frozen"]) == (want.total, want.trainable, want.frozen)
    assert [r[0] for r in out["rows"]][-1] == "LoRA"


@pytest.mark.slow
def test_train_streams_updates_then_translate_gives_two_columns(client, app):
    job = client.submit(rank=4, targets=["q", "v"], steps=12, train_size=32, bleu_size=8, eval_every=6,
                        samples=["Good morning.", "The weather is nice today."], api_name="/train")
    updates = list(job)
    final = job.result()
    assert final["status"] == "completed", final
    steps_seen = [u["step"] for u in updates]
    assert len(updates) >= 3 and steps_seen == sorted(steps_seen) and steps_seen[-1] == 12
    assert any(0 < u["step"] < 12 for u in updates), "no update arrived while training"
    assert [s for s, _ in final["losses"]] == list(range(1, 13))
    assert final["summary"]["probe_loss_base"] is not None
    assert final["quality"]["n"] == 8 and "bleu" in final["quality"]["lora"]
    assert final["quality"]["base"]["loops"] in range(9) and final["quality"]["lora"]["loops"] in range(9)
    change = final["quality"]["change"]["chrf"]   # numbers through the API, not their text
    assert set(change) == {"change", "low", "high", "better", "real"} and isinstance(change["change"], float)
    first = final["quality"]["first_choice"]   # the held-out first choices, base and LoRA, as numbers
    assert all(isinstance(first[k], float) for k in ("base", "lora", "change", "low", "high"))
    assert first["sentences"] == final["summary"]["heldout_pairs"] and first["tokens"] > 0
    assert all(isinstance(w["word"], str) and isinstance(w["lora"], int) for w in final["quality"]["words"])
    # the held-out curve (the default lesson's, base at step 0) and the sample sentences at every evaluation
    assert [s for s, _ in final["heldout_losses"]] == [0, 6, 12] and final["summary"]["stop_reason"] == "all 12 steps"
    assert {u["heldout_name"] for u in updates} == {data.LESSONS[data.DEFAULT_LESSON].heldout_name}   # the live chart names it too
    assert final["samples"]["english"] == ["Good morning.", "The weather is nice today."]
    assert [s for s, texts in final["samples"]["by_step"] if len(texts) == 2 and all(texts)] == [0, 6, 12]
    run_dir = app[1] / "runs" / final["run_id"]
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "metrics.json").is_file()

    out = client.predict(text="The session is resumed.\n\nI thank the Commissioner.", api_name="/translate")
    assert out["english"] == ["The session is resumed.", "I thank the Commissioner."]
    assert len(out["base"]) == len(out["lora"]) == 2 and all(out["base"]) and all(out["lora"])
    assert out["run_id"] == final["run_id"]
    zero = client.predict(text="The session is resumed.", run_id=final["run_id"], scale=0.0, api_name="/translate")
    assert zero["lora"] == zero["base"] == out["base"][:1]
    # a sentence longer than the encoder reads is translated from its head, and the answer says so
    long = " ".join(["The committee met in Brussels and discussed the budget of the next year"] * 25) + "."   # > 256 tokens
    cut = client.predict(text=f"Good morning.\n{long}", run_id=final["run_id"], api_name="/translate")
    said = [n for n in cut["notices"] if n.startswith("sentence 2 is ")]
    assert len(said) == 1 and f"only its first {MAX_SOURCE_TOKENS} were translated" in said[0], cut["notices"]
    assert not any(n.startswith("sentence 1 is ") for n in cut["notices"]), cut["notices"]   # short: not cut


@pytest.mark.slow
def test_repeat_with_seeds_gives_the_mean_and_spread_over_seeds(client):
    with pytest.raises(Exception, match="keeps at most 4 runs"):     # 3 ranks × 2 seeds over the session cap
        client.predict(ranks="1,2,4", seeds="0,1", steps=2, api_name="/sweep")
    final = client.submit(ranks="2", seeds="0,1,2", steps=3, train_size=16, bleu_size=0, samples=[],
                          api_name="/sweep").result()
    assert [(r["seed"], r["status"]) for r in final["runs"]] == [(0, "completed"), (1, "completed"), (2, "completed")]
    (group,) = final["groups"]
    assert group["label"] == "r=2 · q+v" and group["seeds"] == [0, 1, 2]
    assert group["heldout"] == [r["heldout_losses"][-1][1] for r in final["runs"]]
    assert len(set(group["heldout"])) == 3 and final["verdicts"] == [] and "1 in 20" in final["rule"]


def test_stop_ends_the_run_as_stopped(client, app):
    """A second client stops the run with the owner key while the first client's stream is open; that stream
    ends by itself with the run stopped. No client ever has two requests open at once."""
    second = lab_client(app[0])
    job = client.submit(steps=400, train_size=32, bleu_size=0, api_name="/train")
    updates = []
    for update in job:
        updates.append(update)
        if update["step"] >= 2 and len([u for u in updates if u["step"] >= 2]) == 1:
            with pytest.raises(Exception, match="no run or sweep"):      # without the key: refused as before
                second.predict(run_id=update["run_id"], api_name="/stop")
            stopped = second.predict(run_id=update["run_id"], owner_key=update["owner_key"], api_name="/stop")
            assert stopped["stop_requested"] and stopped["stopped"] == update["run_id"]
    assert updates[-1]["status"] == "stopped" and updates[-1]["step"] < 400, updates[-1]
    assert final_row(app[0], update["run_id"])["status"] == "stopped"
    # the next run starts cleanly
    nxt = lab_client(app[0]).submit(steps=2, train_size=16, bleu_size=0, api_name="/train")
    assert nxt.result()["status"] == "completed"


def test_the_owner_key_works_from_any_client_and_is_never_listed_logged_or_written(app):
    """Run ownership survives the connection: a key from /train lets a new client list, translate with,
    inspect, download and delete the run; without it the run stays private. The key appears in no listing,
    no file in the runs directory and no line of the server log."""
    first = lab_client(app[0])
    final = first.submit(rank=2, steps=3, train_size=16, bleu_size=0, api_name="/train").result()
    key, run_id = final["owner_key"], final["run_id"]
    assert len(key) >= 32 and key != run_id
    later = lab_client(app[0])   # e.g. the same script after a crash
    assert later.predict(api_name="/runs") == []
    with pytest.raises(Exception, match="another session"):
        later.predict(text="Hello.", run_id=run_id, api_name="/translate")
    assert [r["run_id"] for r in later.predict(owner_key=key, api_name="/runs")] == [run_id]
    assert later.predict(text="Hello.", run_id=run_id, owner_key=key, api_name="/translate")["run_id"] == run_id
    assert later.predict(run_id=run_id, owner_key=key, api_name="/inspect")["rank"] == 2
    assert later.predict(run_id=run_id, owner_key=key, api_name="/download_adapter").endswith(".zip")
    with pytest.raises(Exception, match="owner_key must be"):
        later.predict(owner_key="guess", api_name="/runs")
    listing = repr(later.predict(all_runs=True, api_name="/runs")) + repr(later.predict(owner_key=key,
                                                                                         api_name="/runs"))
    assert key not in listing
    written = [p for p in (app[1] / "runs").rglob("*") if p.is_file()] + list(app[1].glob("app-*.log"))
    assert written and not [p for p in written if key.encode() in p.read_bytes()]
    assert later.predict(run_id=run_id, owner_key=key, api_name="/delete_run") == {"deleted": run_id}
    assert first.predict(api_name="/runs") == []


def test_bad_input_gets_a_clear_message_and_the_app_keeps_working(client, app):
    from urllib.parse import urlparse

    before = len(list((app[1] / "runs").glob("*/metrics.json")))
    for params, words in (({"rank": 0}, "rank must be between 1 and 256, got 0"),
                          ({"rank": 5000}, "rank must be between 1 and 256, got 5000"),
                          ({"steps": 99999999}, "steps must be between 1 and 2000, got 99999999"),
                          ({"targets": ["q", "attn"]}, "unknown target module")):
        with pytest.raises(Exception, match=words):
            client.predict(**params, api_name="/train")
    with pytest.raises(Exception, match="rank must be between 1 and"):
        client.predict(rank=0, api_name="/params")
    with pytest.raises(Exception, match="at least one English sentence"):
        client.predict(text="  \n ", api_name="/translate")
    assert client.predict(rank=8, api_name="/params")["trainable"] > 0
    assert len(list((app[1] / "runs").glob("*/metrics.json"))) == before      # nothing was trained
    # the log: one line per refusal, no traceback; a deprecation warning at most once
    log = (app[1] / f"app-{urlparse(app[0]).port}.log").read_text()
    assert log.count("refused: rank must be between 1 and 256, got 5000") == 1
    assert "config.ConfigError" not in log and log.count("HTTP_422_UNPROCESSABLE_ENTITY") <= 1


def test_runs_are_listed_per_session_and_translate_uses_the_chosen_run(app):
    mine, other = lab_client(app[0]), lab_client(app[0])
    first = mine.submit(rank=2, steps=3, train_size=16, bleu_size=0, api_name="/train").result()
    second = mine.submit(rank=8, steps=3, train_size=16, bleu_size=0, api_name="/train").result()
    listed = mine.predict(api_name="/runs")
    ids = [r["run_id"] for r in listed]
    assert ids[-2:] == [first["run_id"], second["run_id"]] and [r["rank"] for r in listed[-2:]] == [2, 8]
    assert other.predict(api_name="/runs") == []
    assert {first["run_id"], second["run_id"]} <= {r["run_id"] for r in other.predict(all_runs=True,
                                                                                      api_name="/runs")}
    out = mine.predict(text="The session is resumed.", run_id=first["run_id"], reference="Die Sitzung ist eröffnet.",
                       api_name="/translate")
    assert out["run_id"] == first["run_id"]
    assert len(out["chrf_base"]) == len(out["chrf_lora"]) == 1 and 0 <= out["chrf_lora"][0] <= 100
    with pytest.raises(Exception, match="another session"):
        other.predict(text="Hello.", run_id=first["run_id"], api_name="/translate")


@pytest.mark.slow
def test_rank_sweep_through_the_api(client):
    job = client.submit(ranks="1,2", steps=3, train_size=16, bleu_size=4, api_name="/sweep")
    updates = list(job)
    final = job.result()["runs"]
    assert [r["rank"] for r in final] == [1, 2] and all(r["status"] == "completed" for r in final)
    assert all(r["quality"]["n"] == 4 for r in final)
    assert len({r["sweep"] for r in final}) == 1 and len(updates) >= 4
    with pytest.raises(Exception, match="sweep rank"):
        client.predict(ranks="1,0", api_name="/sweep")


def test_stop_cancels_the_rest_of_a_sweep(client, app):
    second = lab_client(app[0])
    job = client.submit(ranks="1,2,4", steps=400, train_size=16, bleu_size=0, api_name="/sweep")
    asked = None
    for update in job:
        if asked is None and update["runs"][0]["step"] >= 1:
            asked = second.predict(run_id=update["sweep"], owner_key=update["owner_key"], api_name="/stop")
            assert asked["stopped"] == update["sweep"]
    assert [r["status"] for r in update["runs"]] == ["stopped"] * 3     # the stream ended by itself
    final = [final_row(app[0], r["run_id"]) for r in update["runs"]]
    assert [r["status"] for r in final] == ["stopped"] * 3
    assert final[0]["steps_done"] < 400 and final[1]["steps_done"] == final[2]["steps_done"] == 0
    assert "waiting in the queue" in final[2]["error"]


def test_adapter_download_import_and_bad_uploads(client, app, tmp_path):
    """Download a run's adapter, import it in another session (same translations); corrupt, pickled and
    mismatched uploads get a clear message, change nothing on disk, and the app keeps working."""
    import json
    import pickle
    import zipfile

    from conftest import build, tiny_config
    from gradio_client import handle_file

    from lora_demo import adapters
    from lora_demo.core.config import LoraConfig
    from lora_demo.core.inject import apply_lora

    run = client.submit(rank=4, targets=["q", "v"], steps=3, train_size=16, bleu_size=0, api_name="/train").result()
    zipped = client.predict(run_id=run["run_id"], api_name="/download_adapter")
    with zipfile.ZipFile(zipped) as zf:
        names = sorted(n.split("/")[-1] for n in zf.namelist())
        conf = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("adapter_config.json"))))
    assert names == ["adapter_config.json", "adapter_model.safetensors"] and conf["r"] == 4
    other = lab_client(app[0])
    with pytest.raises(Exception, match="another session"):
        other.predict(run_id=run["run_id"], api_name="/download_adapter")

    garbage = tmp_path / "adapter_model.safetensors"
    garbage.write_bytes(b"\x00\x00 not a tensor file")
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps(conf))
    pickled = tmp_path / "adapter.zip"
    with zipfile.ZipFile(pickled, "w") as zf:
        zf.writestr("adapter_config.json", json.dumps(conf))
        zf.writestr("adapter_model.bin", pickle.dumps({"lora_A": [1.0]}))
    small = build(tiny_config())          # d_model 16: does not fit the bundled micro (d_model 128)
    apply_lora(small, LoraConfig(rank=4, targets=("q", "v")))
    wrong = adapters.save_adapter(small, LoraConfig(rank=4, targets=("q", "v")), "micro", tmp_path / "wrong")
    runs_dir = app[1] / "runs"
    listing = sorted(p.name for p in runs_dir.iterdir())
    cases = [([garbage, config], "not a safetensors file"), ([pickled], "pickle-based weight files are refused"),
             ([wrong / "adapter_config.json", wrong / "adapter_model.safetensors"], "this model's layer is 128"),
             ([config], "adapter_model.safetensors missing")]
    for files, message in cases:
        with pytest.raises(Exception, match=message):
            other.predict(files=[handle_file(str(f)) for f in files], api_name="/import_adapter")
    assert sorted(p.name for p in runs_dir.iterdir()) == listing   # nothing written

    imported = other.predict(files=[handle_file(zipped)], api_name="/import_adapter")
    assert imported["status"] == "imported" and imported["rank"] == 4 and imported["adapter_bytes"] > 0
    assert imported["run_id"] in {r["run_id"] for r in other.predict(api_name="/runs")}
    text = "I would like to thank the Commissioner for her answer."
    theirs = other.predict(text=text, run_id=imported["run_id"], scale=2.0, api_name="/translate")
    ours = client.predict(text=text, run_id=run["run_id"], scale=2.0, api_name="/translate")
    assert theirs["lora"] == ours["lora"] and theirs["base"] == ours["base"]

    merged = other.predict(run_id=imported["run_id"], api_name="/download_merged")
    with zipfile.ZipFile(merged) as zf:
        assert {"tf_model.h5", "config.json", "lora_lab_merge.json"} <= {n.split("/")[-1] for n in zf.namelist()}


@pytest.mark.slow
def test_inside_the_adapter_through_the_api(client):
    """On micro runs trained in the app: the ΔW figures, φ between two ranks, the predicted and measured
    budget side by side, and partial switch-off in Translate (everything off = the base exactly)."""
    strong = dict(targets=["q", "v", "o", "wo"], steps=30, lr=0.05, train_size=32, bleu_size=0)
    r8 = client.submit(rank=8, api_name="/train", **strong).result()
    r2 = client.submit(rank=2, api_name="/train", **strong).result()
    info = client.predict(run_id=r8["run_id"], api_name="/inspect")
    assert info["rank"] == 8 and len(info["layers"]) == 3 * 4 + 3 * 7   # encoder q,v,o,wo; decoder also cross q,v,o
    assert all(len(x["singular_values"]) == 8 and 1 <= x["effective_rank"] <= 8 and x["relative"] > 0
               for x in info["layers"])
    assert len(info["heatmap"]["rows"]) == 6 and "ffn wo" in info["heatmap"]["columns"]
    sim = client.predict(run_a=r8["run_id"], run_b=r2["run_id"], api_name="/similarity")
    assert sim["k"] == 2 and all(0 <= x["phi_k"] <= 1 for x in sim["layers"])
    self_sim = client.predict(run_a=r8["run_id"], run_b=r8["run_id"], api_name="/similarity")
    assert all(abs(x["phi_k"] - 1) < 1e-9 for x in self_sim["layers"])
    spent = client.predict(run_id=r8["run_id"], api_name="/budget")
    rows = {r[0]: r for r in spent["rows"]}
    for exact in ("trainable parameters", "adapter tensors (MB)", "optimiser state (MB)"):
        assert rows[exact][1] == rows[exact][2] and rows[exact][3] == 0.0, rows[exact]
    assert rows["step time (s)"][2] > 0
    later = client.predict(run_id=r2["run_id"], api_name="/budget")   # queued after r8 ended: calibrated by it
    assert later["predicted"]["lora"]["step_s_est"] > 0 and later["rows"][4][2] > 0

    text = "\n".join(["The session is resumed.", "I would like to thank the Commissioner for her answer.",
                      "The European Parliament adopted the resolution.", "Obama receives Netanyahu."])
    full = client.predict(text=text, run_id=r8["run_id"], scale=2.0, api_name="/translate")
    off = client.predict(text=text, run_id=r8["run_id"], scale=2.0, sides=[], api_name="/translate")
    assert off["lora"] == off["base"] == full["base"] and full["lora"] != full["base"]
    assert any("partly switched off" in n for n in off["notices"])
    partial = [client.predict(text=text, run_id=r8["run_id"], scale=2.0, api_name="/translate", **keep)["lora"]
               for keep in (dict(sides=["encoder"]), dict(sides=["decoder"]), dict(modules=["ffn wo"]),
                            dict(blocks="0-0"))]
    assert any(p != full["lora"] for p in partial)       # parts of the adapter matter differently
    refs = "\n".join(["Die Sitzung ist wieder aufgenommen.", "Ich danke der Kommissarin für ihre Antwort.",
                      "Das Europäische Parlament hat die Entschließung angenommen.", "Obama empfängt Netanjahu."])
    both = client.predict(text=text, run_id=r8["run_id"], scale=2.0, beside=[r2["run_id"]], reference=refs,
                          api_name="/translate")
    alone = client.predict(text=text, run_id=r2["run_id"], scale=2.0, api_name="/translate")
    assert [r["run_id"] for r in both["runs"]] == [r8["run_id"], r2["run_id"]] and both["base"] == full["base"]
    assert [r["german"] for r in both["runs"]] == [full["lora"], alone["lora"]]   # one decode = each run alone
    assert both["runs"][0]["chrf"] == both["chrf_lora"] and all(len(r["chrf"]) == 4 for r in both["runs"])
    with pytest.raises(Exception, match="unknown module type"):
        client.predict(text=text, modules=["attn"], api_name="/translate")


@pytest.mark.slow
def test_methods_through_the_api_train_analyse_translate_and_refuse_what_does_not_apply(client, app):
    """A one-request method comparison (DoRA and full fine-tuning), each run's analysis, translation at
    scale 0 (the base, for full fine-tuning too) and an adapter download that full fine-tuning cannot give."""
    with pytest.raises(Exception, match="unknown method 'qlora'"):
        client.predict(ranks="2", methods="dora,qlora", api_name="/sweep")
    with pytest.raises(Exception, match="LoRA\\+ is built on AdamW"):
        client.predict(method="loraplus", optimizer="lamb", steps=2, api_name="/train")
    final = client.submit(ranks="2", methods="dora,full", steps=4, lr=1e-3, train_size=16, bleu_size=0, samples=[],
                          api_name="/sweep").result()
    dora, full = final["runs"]
    assert (dora["status"], full["status"]) == ("completed", "completed"), final
    assert [g["method"] for g in final["groups"]] == ["dora", "full"]
    assert final["groups"][1]["label"] == "full fine-tuning"
    conf = (app[1] / "runs" / dora["run_id"] / "adapter_config.json").read_text()
    assert '"use_dora": true' in conf
    rec_full = final_row(app[0], full["run_id"])
    assert rec_full["method"] == "full" and rec_full["params"]["trainable"] == rec_full["params"]["total"]
    for run in (dora, full):
        a = client.predict(run_id=run["run_id"], api_name="/analyse")
        row = final_row(app[0], run["run_id"])
        curve = a["scale_curve"]
        assert [p["scale"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
        # the analysis measures in float32 on the translator; the run measured on its trainer, which computes
        # in bf16 where the CPU does it fast (full fine-tuning trains a float32 copy): rounding apart, equal
        tol = 1e-5 if run is full else 1e-3
        s = row["summary"]
        for got, want in ((curve[0]["heldout"], s["base_heldout_loss"]), (curve[-1]["heldout"], s["final_heldout_loss"]),
                          (curve[0]["forget"], s["base_val_loss"]), (curve[-1]["forget"], s["final_val_loss"])):
            assert got == pytest.approx(want, rel=tol)
        assert curve[0]["heldout"] != curve[-1]["heldout"]
        assert a["layers"]["layers"] and all(x["intruders_random"] >= 0 for x in a["layers"]["layers"])
        assert (len(a["truncation"]) == 2) == (run is dora)   # k = 1..r for an adapter; none for full
        text = "The session is resumed."
        zero = client.predict(text=text, run_id=run["run_id"], scale=0.0, api_name="/translate")
        assert zero["lora"] == zero["base"]
    with pytest.raises(Exception, match="full fine-tuning: there is no adapter"):
        client.predict(run_id=full["run_id"], api_name="/download_adapter")
    with pytest.raises(Exception, match="no low-rank factors"):
        client.predict(run_id=full["run_id"], api_name="/inspect")


def test_under_two_workers_the_app_tests_share_one_worker(app, request):
    """pytest-xdist's loadgroup keeps every test of the shared app in one worker (conftest marks them), so the
    suite launches the app once (and restarts it once), never once per worker."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        assert request.node.nodeid.endswith("@shared_app"), request.node.nodeid
    assert len(list(app[1].glob("app-*.log"))) == 1   # this app's first launch (the restart comes last)
