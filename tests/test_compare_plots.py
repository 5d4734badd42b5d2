"""The comparison table and every chart are built from records alone (plots.py and compare.py are pure)."""

import csv
import io

from lora_demo import compare, plots


def record(run_id, rank, losses, vals, bleu=None, trainable=1000):
    return {
        "run_id": run_id, "status": "completed", "config": {"lora": {"rank": rank, "alpha": 16.0,
                                                                      "targets": ["q", "v"], "side": "both",
                                                                      "layers": None}},
        "params": {"trainable": trainable, "pct_trainable": 0.5, "adapter_mb": trainable * 4 / 1e6},
        "losses": [[i + 1, v, 100 * (i + 1)] for i, v in enumerate(losses)], "val_losses": vals,
        "summary": {"final_loss": losses[-1], "final_val_loss": vals[-1][1], "mean_step_s": 0.5,
                    "first_loss_s": 2.0},
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


def test_csv_and_markdown_exports():
    parsed = list(csv.reader(io.StringIO(compare.to_csv([A, B]))))
    assert parsed[0] == compare.COLUMNS and [r[0] for r in parsed[1:]] == ["run-a", "run-b"]
    md = compare.to_markdown([A, B])
    assert md.count("\n| run-") == 2 and "16,000" in md and "sacreBLEU signature: sig" in md


def test_overlay_has_train_and_val_per_run_coloured_by_rank():
    fig = plots.loss_overlay([A, B])
    assert len(fig.data) == 4
    colors = {t.name: t.line.color for t in fig.data}
    assert colors["r=2 q+v · run-a train"] == colors["r=2 q+v · run-a val"]
    assert colors["r=2 q+v · run-a train"] != colors["r=16 q+v · run-b train"]
    assert fig.data[1].line.dash == "dot" and fig.data[0].line.dash is None
    assert list(fig.data[0].x) == [1, 2, 3]


def test_overlay_toggles_tokens_axis_and_log_scale():
    fig = plots.loss_overlay([A], show_val=False, x="tokens", log_y=True)
    assert len(fig.data) == 1 and list(fig.data[0].x) == [100, 200, 300]
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "training tokens"
    val_only = plots.loss_overlay([A], show_train=False, x="tokens")
    assert list(val_only.data[0].x) == [0, 300]  # step 0 (base) at 0 tokens, step 3 at its tokens


def test_quality_chart_plots_lora_score_against_trainable_params():
    fig = plots.quality_figure([A, B, record("run-c", 4, [3.0], [[0, 4.0]])], metric="bleu")
    points = [(t.x[0], t.y[0]) for t in fig.data]
    assert points == [(2000, 6.0), (16000, 7.5)]  # run-c has no score and is left out
    assert fig.layout.shapes[0].y0 == 5.0  # the base model's line
    assert plots.quality_figure([A], metric="chrf").data[0].y[0] == 31.0
