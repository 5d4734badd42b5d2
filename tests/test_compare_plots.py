"""The comparison table and every chart are built from records alone (plots.py and compare.py are pure)."""

import csv
import io

import pytest

from lora_demo.analysis import compare
from lora_demo import data
from lora_demo.present import plots


def record(run_id, rank, losses, vals, bleu=None, trainable=1000, seed=0, heldout=None):
    heldout = heldout if heldout is not None else [[0, 5.0], [len(losses), 4.5]]
    return {
        "run_id": run_id, "status": "completed", "config": {"model": "m",
                                                             "lora": {"rank": rank, "alpha": 16.0,
                                                                      "targets": ["q", "v"], "side": "both",
                                                                      "layers": None},
                                                             "train": {"seed": seed, "data": "news", "lr": 0.003}},
        "params": {"trainable": trainable, "pct_trainable": 0.5, "adapter_mb": trainable * 4 / 1e6},
        "losses": [[i + 1, v, 100 * (i + 1)] for i, v in enumerate(losses)], "val_losses": vals,
        "heldout_losses": heldout,
        "summary": {"final_loss": losses[-1], "final_val_loss": vals[-1][1], "mean_step_s": 0.5,
                    "first_loss_s": 2.0, "base_heldout_loss": heldout[0][1], "final_heldout_loss": heldout[-1][1],
                    "heldout_name": "newstest2014"},
        "quality": None if bleu is None else {"n": 10, "base": {"bleu": 5.0, "chrf": 30.0},
                                              "lora": {"bleu": bleu, "chrf": 31.0, "bleu_signature": "sig"}},
        "memory": {"peak_rss_mb": 900.0}, "adapter": {"bytes": trainable * 4 + 400},
    }


A = record("run-a", 2, [3.0, 2.5, 2.0], [[0, 4.0], [3, 3.5]], bleu=6.0, trainable=2000)
B = record("run-b", 16, [3.1, 2.2, 1.5], [[0, 4.0], [3, 3.2]], bleu=7.5, trainable=16000)


def test_table_rows_hold_the_record_numbers():
    rows = compare.table([A, B])
    assert len(rows[0]) == len(compare.COLUMNS)
    a = dict(zip(compare.COLUMNS, rows[0]))
    assert a["rank"] == 2 and a["trainable"] == 2000 and a["steps"] == 3
    assert a["BLEU base"] == 5.0 and a["BLEU LoRA"] == 6.0 and a["adapter MB"] == round(8400 / 1e6, 3)
    assert a["train loss"] == 2.0 and a["val loss"] == 3.5
    assert a["chrF change"] is None   # a record from before the paired bootstrap was kept
    assert a["first choice Δ pts"] is None and len(compare.WIDTHS) == len(compare.COLUMNS)


@pytest.mark.parametrize("change, low, high, verdict", [
    (-2.06, -3.46, -0.63, "real fall"), (1.2, 0.3, 2.0, "real rise"), (-1.03, -2.06, 0.03, "noise")])
def test_the_table_says_whether_a_runs_chrf_change_is_more_than_sentence_noise(change, low, high, verdict):
    rec = record("run-c", 8, [3.0], [[0, 4.0]], bleu=6.0)
    rec["quality"]["change"] = {"chrf": {"change": change, "low": low, "high": high, "better": 0.5,
                                         "real": low > 0 or high < 0}}
    assert dict(zip(compare.COLUMNS, compare.row(rec)))["chrF change"] == verdict
    rec["quality"]["first_choice"] = {"base": 0.2853, "lora": 0.2726, "change": 0.2726 - 0.2853}
    assert dict(zip(compare.COLUMNS, compare.row(rec)))["first choice Δ pts"] == -1.27   # points of the share


def test_the_seed_groups_count_each_seeds_chrf_verdict():
    runs = _seeded(8, [4.1, 4.3, 4.2])
    for rec, (change, low, high) in zip(runs, [(-2.06, -3.46, -0.63), (-2.13, -3.28, -0.93), (-1.03, -2.06, 0.03)]):
        rec["quality"] = {"n": 100, "base": {"bleu": 7.5, "chrf": 31.8}, "lora": {"bleu": 7.0, "chrf": 31.8 + change},
                          "change": {"chrf": {"change": change, "low": low, "high": high, "better": 0.0,
                                              "real": low > 0 or high < 0}}}
    for rec, first in zip(runs, (-0.0128, -0.0132, -0.0106)):
        rec["quality"]["first_choice"] = {"change": first}
    row = dict(zip(compare.GROUP_COLUMNS, compare.group_table(compare.groups(runs))[0]))
    assert row["chrF change per seed"] == "2 real falls · 1 noise"
    assert row["first choice Δ pts (mean)"] == -1.22   # the mean of -1.28, -1.32 and -1.06 points
    assert compare.verdict_counts(["real rise"]) == "1 real rise" and compare.verdict_counts([]) is None


def test_csv_and_markdown_exports():
    parsed = list(csv.reader(io.StringIO(compare.to_csv([A, B]))))
    assert parsed[0] == compare.COLUMNS and [r[0] for r in parsed[1:]] == ["run-a", "run-b"]
    md = compare.to_markdown([A, B])
    assert md.count("\n| run-") == 2 and "16,000" in md and "sacreBLEU signature: sig" in md


def test_overlay_has_train_heldout_and_val_per_run_coloured_by_rank():
    fig = plots.loss_overlay([A, B])
    assert len(fig.data) == 6
    colors = {t.name: t.line.color for t in fig.data}
    assert colors["r=2 q+v · run-a train (EMA 0.9)"] == colors["r=2 q+v · run-a val"] == \
        colors["r=2 q+v · run-a held-out"]
    assert colors["r=2 q+v · run-a train (EMA 0.9)"] != colors["r=16 q+v · run-b train (EMA 0.9)"]
    assert fig.data[2].line.dash == "dot" and fig.data[0].line.dash is None
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == pytest.approx(plots.ema([3.0, 2.5, 2.0]))


def test_overlay_toggles_tokens_axis_and_log_scale():
    fig = plots.loss_overlay([A], show_val=False, show_heldout=False, x="tokens", log_y=True)
    assert len(fig.data) == 1 and list(fig.data[0].x) == [100, 200, 300]
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "training tokens"
    val_only = plots.loss_overlay([A], show_train=False, show_heldout=False, x="tokens")
    assert list(val_only.data[0].x) == [0, 300]  # step 0 (base) at 0 tokens, step 3 at its tokens


def test_quality_chart_plots_lora_score_against_trainable_params():
    fig = plots.quality_figure([A, B, record("run-c", 4, [3.0], [[0, 4.0]])], metric="bleu")
    points = [(t.x[0], t.y[0]) for t in fig.data]
    assert points == [(2000, 6.0), (16000, 7.5)]  # run-c has no score and is left out
    assert fig.layout.shapes[0].y0 == 5.0  # the base model's line
    assert plots.quality_figure([A], metric="chrf").data[0].y[0] == 31.0


def test_ema_is_tensorboards_debiased_smoothing():
    assert plots.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])   # debiased: no pull towards 0
    assert plots.ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 5.0 / 0.75])
    assert plots.ema([3.0, 1.0, 4.0], 0.0) == [3.0, 1.0, 4.0]
    noisy = [4.0 - 0.01 * i + (0.5 if i % 2 else -0.5) for i in range(100)]
    smooth = plots.ema(noisy, 0.9)
    assert max(abs(a - b) for a, b in zip(smooth[20:], smooth[21:])) < 0.15 < max(
        abs(a - b) for a, b in zip(noisy, noisy[1:]))
    with pytest.raises(ValueError):
        plots.ema([1.0], 1.0)


def test_live_loss_chart_names_each_curve():
    fig = plots.loss_figure(A, smoothing=0.8)
    assert [t.name for t in fig.data] == ["train, each batch", "train, smoothed (EMA 0.8)",
                                          "held-out: newstest2014<br>(never trained on)",
                                          "what the base knew:<br>Europarl rows 19,500+ (forgetting)"]
    assert list(fig.data[1].y) == pytest.approx(plots.ema([3.0, 2.5, 2.0], 0.8))
    assert [t.name for t in plots.loss_figure(A, smoothing=0).data][0] == "train, each batch"
    assert len(plots.loss_figure(A, smoothing=0).data) == 3
    # a live status (no summary yet) names its held-out slice from the run's data
    live = {k: v for k, v in A.items() if k != "summary"} | {"heldout_name": data.HELDOUT_NAMES["europarl"]}
    assert plots.loss_figure(live).data[2].name == "held-out: europarl rows 19500+<br>(never trained on)"
    # the app's chart draws job.record(): the name comes from its config until the summary exists
    running = {k: v for k, v in A.items() if k != "summary"} | {"config": {"train": {"data": "europarl"}}}
    assert plots.loss_figure(running).data[2].name == "held-out: europarl rows 19500+<br>(never trained on)"
    assert plots.loss_figure(running).data[3].name == "what the base knew:<br>newstest2015 (forgetting)"


def _seeded(rank, finals):
    return [record(f"r{rank}-s{i}", rank, [3.0], [[0, 4.0], [1, 3.9]], seed=i, heldout=[[0, 5.0], [1, f]])
            for i, f in enumerate(finals)]


def test_groups_give_each_config_its_mean_and_spread_over_seeds():
    gs = compare.groups(_seeded(4, [4.1, 4.3, 4.2]) + _seeded(1, [4.5, 4.4, 4.6]))
    assert [g["label"] for g in gs] == ["r=1 · q+v", "r=4 · q+v"] and [g["seeds"] for g in gs] == [[0, 1, 2]] * 2
    row = dict(zip(compare.GROUP_COLUMNS, compare.group_table(gs)[1]))
    assert row["held-out mean"] == pytest.approx(4.2) and row["held-out sd"] == pytest.approx(0.1)
    assert (row["held-out min"], row["held-out max"]) == (4.1, 4.3) and row["Δ vs base (mean)"] == pytest.approx(-0.8)
    assert row["chrF change per seed"] is None   # no run of these has a paired bootstrap
    fig = plots.seeds_figure(gs)
    assert list(fig.data[0].y) == pytest.approx([4.5, 4.2]) and len(fig.data[1].y) == 6


def _rerun(rec: dict, run_id: str, created: float, final: float) -> dict:
    """The same config and seed trained again, finished later, ending at ``final``."""
    return {**rec, "run_id": run_id, "created": created,
            "heldout_losses": [[0, 5.0], [1, final]], "summary": {**rec["summary"], "final_heldout_loss": final}}


def test_rerunning_one_seed_never_makes_a_verdict_resolved():
    """A group counts distinct seeds: reruns of seed 0 replace its older run (the newest is kept, and the table
    says how many were replaced), so one seed run five times is still one seed, and r=1 against r=4 with one
    seed each stays 'not resolved' (chance 1 in 2) however often seed 0 is rerun."""
    r1, r4 = _seeded(1, [4.5]), _seeded(4, [4.1])
    reruns = [_rerun(r4[0], f"r4-again-{i}", 100.0 + i, 4.1 + 0.001 * i) for i in range(5)]
    reruns += [_rerun(r1[0], f"r1-again-{i}", 200.0 + i, 4.5 - 0.001 * i) for i in range(5)]
    g1, g4 = compare.groups(r1 + r4 + reruns)
    assert g1["seeds"] == g4["seeds"] == [0] and g1["repeats"] == g4["repeats"] == 5
    assert g4["runs"] == ["r4-again-4"] and g4["heldout"] == [pytest.approx(4.104)]   # the newest rerun
    v = compare.verdict(g1, g4)
    assert v["separated"] and not v["resolved"] and v["chance"] == pytest.approx(1 / 2), v
    row = dict(zip(compare.BRIEF_GROUP_COLUMNS, compare.group_brief([g4])[0]))
    assert row["seeds"] == "1 (5 reruns replaced)"
    # two distinct seeds each, each rerun many times: still 1 in 6, never 1 in 20
    two = _seeded(1, [4.5, 4.6]) + _seeded(4, [4.1, 4.2])
    more = [_rerun(r, f"{r['run_id']}-again-{i}", 300.0 + i, r["summary"]["final_heldout_loss"])
            for r in two for i in range(4)]
    v = compare.verdict(*compare.groups(two + more))
    assert not v["resolved"] and "1 in 6" in v["text"]


def test_verdict_resolves_only_non_overlapping_seeds_with_enough_of_them():
    r1, r4 = compare.groups(_seeded(1, [4.5, 4.4, 4.6]) + _seeded(4, [4.1, 4.3, 4.2]))
    v = compare.verdict(r1, r4)
    assert v["resolved"] and v["chance"] == pytest.approx(1 / 20) and v["diff"] == pytest.approx(0.3)
    assert v["text"].startswith("r=4 · q+v is better than r=1 · q+v above seed noise")
    r1, r4 = compare.groups(_seeded(1, [4.5, 4.25, 4.6]) + _seeded(4, [4.1, 4.3, 4.2]))   # ranges overlap
    v = compare.verdict(r1, r4)
    assert not v["resolved"] and not v["separated"] and "within seed noise" in v["text"]
    r1, r4 = compare.groups(_seeded(1, [4.5, 4.4]) + _seeded(4, [4.1, 4.3]))   # apart, but only 2 seeds each
    v = compare.verdict(r1, r4)
    assert v["separated"] and not v["resolved"] and "1 in 6" in v["text"]
