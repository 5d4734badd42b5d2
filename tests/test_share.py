"""A setup as a link and as a command line (share.py): what the page writes into its address reads back to
the same controls, bad links are refused value by value, and the command lines parse, through the CLI's own
parser, into exactly the config the page's Train button makes."""

import shlex
from dataclasses import fields

import pytest

from lora_demo.app.common import Form
from lora_demo.core import settings
from lora_demo.present import share
from lora_demo.cli import _parser, _run_config
from lora_demo.core.config import METHODS, LoraConfig, RunConfig, TrainConfig

LIMITS = {"rank": share.Limit(1, 64, 1), "alpha": share.Limit(1, 128, 1), "steps": share.Limit(1, 2000, 1),
          "pairs": share.Limit(8, 20000, 8), "lr": share.Limit(1e-6, 1.0), "seed": share.Limit(0, 2**31 - 1),
          "method": share.Limit(choices=METHODS), "targets": share.Limit(choices=("q", "k", "v", "o")),
          "blocks": share.Limit(0, 7, 1), "optimizer": share.Limit(choices=("adamw", "radam"))}


def test_the_link_reads_back_to_the_same_controls():
    values = {"method": "dora", "rank": 4, "alpha": 32.0, "targets": ["q", "v"], "blocks": (2, 5), "steps": 60,
              "lr": 0.003, "pairs": 512, "seed": 7, "optimizer": "radam", "ranks": "1,4,16"}
    query = share.to_query(values)
    assert "targets=q,v" in query and "blocks=2-5" in query and "lr=0.003" in query
    back, notes = share.from_query(query, LIMITS)
    assert notes == [] and back == {**values, "blocks": (2, 5), "alpha": 32.0}


@pytest.mark.parametrize("query, says", [
    ("rank=0", "outside 1–64"), ("rank=4.5", "not a whole number"), ("rank=abc", "not a number"),
    ("pairs=100", "multiple of 8"), ("lr=nan", "finite"), ("method=lorax", "not one of"),
    ("targets=q,zz", "choose from"), ("blocks=5-2", "first block comes after"), ("colour=red", "unknown setting"),
])
def test_a_bad_value_is_left_out_with_a_notice(query, says):
    back, notes = share.from_query(query + "&steps=30", LIMITS)
    assert back == {"steps": 30} and len(notes) == 1 and says in notes[0], notes


def test_an_instructor_link_hides_controls_and_names_unknown_ones():
    hide, notes = share.hidden("?rank=4&hide=optimizer,seed,colour")
    assert hide == {"optimizer", "seed"} and "colour" in notes[0]
    assert share.from_query("?rank=4&hide=optimizer", LIMITS) == ({"rank": 4}, [])


@pytest.mark.parametrize("method, layers, seeds", [("lora", None, 1), ("loraplus", (1, 4), 1), ("full", None, 3)])
def test_the_command_line_makes_the_pages_config(method, layers, seeds):
    """What the CLI builds from the printed line equals the run the page queues (the same values)."""
    page = RunConfig(model="tiny", lora=LoraConfig(rank=4, alpha=8, targets=("q", "k", "v"), side="decoder",
                                                   layers=layers, method=method, loraplus_ratio=8),
                     train=TrainConfig(steps=30, batch_size=4, lr=2e-3, train_size=256, seed=3, eval_every=10,
                                       early_stop=2, bleu_size=20, checkpoint_every=5, data="europarl",
                                       samples=("One sentence.", "Another one.")))
    values = {**settings.values_of(page, depth=6), "seeds": seeds, "ranks": "4", "methods": method}
    lines = share.cli_lines(values, "tiny", "fp32", "bundled", depth=6, samples=page.train.samples)
    args = _parser().parse_args(shlex.split(lines["train"])[3:])
    assert args.command == ("train" if seeds == 1 else "sweep")
    cli = _run_config(args, rank=4, seed=3, method=method)
    assert cli.lora == page.lora and cli.train == page.train and args.precision == "fp32" and args.data == "bundled"
    if seeds > 1:
        assert args.seeds == "3,4,5"
    # the sweep line keeps the page's learning rate (no per-method override), the methods line lists them
    sweep = _parser().parse_args(shlex.split(lines["sweep"])[3:])
    assert _run_config(sweep, rank=4, seed=3, method=method).train.lr == page.train.lr
    assert f"--methods {method}" in lines["methods"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The app's page built in-process on micro (not served): its components and event wiring."""
    from lora_demo.app import build_demo
    from lora_demo.core.models import load_model
    from lora_demo.lab import Lab

    return build_demo(Lab(load_model("micro"), runs_dir=tmp_path_factory.mktemp("page-runs")))


def test_the_link_follows_a_users_edit_once_and_a_restore_once(page):
    """The breakdown, the budget and the link are computed from the page's initial controls. Each control's own edit (.input) updates the link; controls set by code (a link restored, a run
    duplicated, a method's learning rate filled in) are followed by one link update after them, never by
    one per control (a .change on every control fired it once for each restored control)."""
    import functools

    from lora_demo.app import breakdown, sharing

    fns = page.fns
    # the form's handlers work on exactly the inputs they are wired with, at the page's initial values
    for f in fns.values():
        if getattr(f.fn, "func", None) in (breakdown.ui_params, breakdown.ui_budget, sharing.ui_share):
            out = f.fn({c: c.value for c in f.inputs})
            text = " ".join(map(str, out.values() if isinstance(out, dict) else out))
            assert "⚠️" not in text and "fix the setup" not in text, (f.fn.func.__name__, text[:300])
    sharing = [f for f in fns.values() if isinstance(f.fn, functools.partial) and f.fn.func is sharing.ui_share]
    triggers = [t[1] for f in sharing for t in f.targets]
    # every control but the method (+ the ranks and methods lists): the method's edit fills in its learning
    # rate first, and the link follows that fill once
    assert "change" not in triggers and triggers.count("input") == len(fields(Form)) - 1 + 2
    method_id = next(f.inputs[0]._id for f in fns.values() if getattr(f.fn, "__name__", "") == "<lambda>"
                     and f.outputs and len(f.outputs) == 2 and f.inputs and f.inputs[0].elem_id == "method")
    assert method_id not in {t[0] for f in sharing for t in f.targets}
    after = {getattr(fns[f.trigger_after].fn, "func", fns[f.trigger_after].fn).__name__
             for f in sharing if f.trigger_after is not None}
    assert after == {"ui_from_url", "ui_duplicate", "<lambda>"}


def test_every_table_on_the_page_redraws_all_its_rows(page):
    """Gradio 6.17's Dataframe keeps drawing the rows of its first update until something scrolls it; the
    page sends each table a scroll after each change of its value (the browser test sees the method
    comparison's table grow from one group to three, live)."""
    import gradio as gr

    from lora_demo.app import ROWS_JS

    tables = {b._id for b in page.blocks.values() if isinstance(b, gr.Dataframe)}
    nudged = {t[0] for f in page.fns.values() if f.js == ROWS_JS and f.fn is None for t in f.targets
              if t[1] == "change"}
    assert len(tables) >= 6 and tables == nudged
