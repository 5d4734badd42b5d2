"""The settings table (core/settings.py) is the one declaration of every setting: each page setting walks
URL -> config -> printed CLI line -> CLI parser -> config and comes back equal; the CLI's flags, the form's
fields and the API's parameters are the table's; and every config field is either in the table or named
here as internal (so a new field cannot be forgotten in the form, the link, the CLI and the API)."""

import inspect
import shlex
from dataclasses import fields

import pytest

from lora_demo.app.api import Api
from lora_demo.app.common import Form
from lora_demo.cli import _parser, _run_config
from lora_demo.core import settings
from lora_demo.core.config import LoraConfig, RunConfig, TrainConfig
from lora_demo.present import share

DEPTH = 6
# config fields with no control, flag or parameter: the recipe's fixed parts
INTERNAL = {"lora": set(), "train": {"weight_decay", "warmup_steps", "clip_norm", "max_source_len", "max_target_len"}}


def _other(s: settings.Setting):
    """A valid value of the setting that is not its default."""
    d = s.default
    if s.key == "optimizer":
        return "radam" if d != "radam" else "adamw"
    if s.kind == "choice":
        return next(c for c in s.choices if c != d)
    if s.kind == "list":
        return ["q", "k"]
    if s.kind == "range":
        return (1, 3)
    if s.kind == "int":
        step = s.step or 1
        return int(d + step if s.top is None or d + step <= s.top else d - step)
    if s.kind == "float":
        return d * 2 if s.top is None or d * 2 <= s.top else d / 2
    raise AssertionError(f"no test value for {s.key} ({s.kind})")


def _limit(s: settings.Setting) -> share.Limit:
    return share.Limit(s.lo, s.top, s.step, s.choices)


@pytest.mark.parametrize("key", [k for k, s in settings.BY_KEY.items() if s.field])
def test_every_page_setting_walks_url_config_cli_config(key):
    s = settings.BY_KEY[key]
    value = _other(s)
    query = share.to_query({key: value})
    values, notes = share.from_query(query, {key: _limit(s)})
    assert notes == [] and key in values, (query, notes)
    page = settings.config_of(values, "tiny", DEPTH)
    got = getattr(getattr(page, s.part), s.name)
    assert got != s.default and got == (tuple(value) if isinstance(value, list) else value), (key, got)
    assert settings.values_of(page, DEPTH)[key] == (tuple(value) if s.kind == "range" else value)
    line = share.cli_lines({**settings.values_of(page, DEPTH), "ranks": "", "methods": ""}, "tiny", "fp32",
                           "auto", DEPTH, samples=page.train.samples)["train"]
    args = _parser().parse_args(shlex.split(line)[3:])
    assert _run_config(args) == page, line


def test_the_cli_flags_and_the_form_fields_are_the_tables():
    train = next(a for a in _parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "rank")
    assert train.default == LoraConfig().rank
    flags = {o for a in _parser()._subparsers._group_actions[0].choices["train"]._actions for o in a.option_strings}
    assert {s.cli for s in settings.SETTINGS if s.field} <= flags
    form = {f.name for f in fields(Form)}
    assert {f for s in settings.SETTINGS for f in s.form} <= form
    assert set(Form.SHARED) == {k for k, s in settings.BY_KEY.items() if s.form}
    # the defaults a plain `train` gets are the config's
    args = _parser().parse_args(["train", "--out", "x", "--model", "tiny"])
    assert _run_config(args) == RunConfig(model="tiny")


def test_the_api_parameters_are_the_tables_with_the_configs_defaults():
    sig = inspect.signature(Api.train).parameters
    for s in settings.SETTINGS:
        if not s.field or not s.api:
            continue
        for name in s.api:
            assert name in sig, f"/train has no parameter {name} for {s.field}"
        default = sig[s.api[0]].default
        if s.kind == "list" or s.name == "samples":
            assert default is None        # None: the config's own (targets), or none (samples)
        elif s.kind == "range":
            assert (sig["first_layer"].default, sig["last_layer"].default) == (0, -1)   # every block
        else:
            assert default == s.default, (s.field, default, s.default)
    sweep = inspect.signature(Api.sweep).parameters
    assert {"ranks", "seeds", "methods"} <= set(sweep)


def test_every_config_field_is_declared_or_internal():
    for part, cls in (("lora", LoraConfig), ("train", TrainConfig)):
        declared = {s.name for s in settings.SETTINGS if s.part == part}
        assert {f.name for f in fields(cls)} == declared | INTERNAL[part], part
