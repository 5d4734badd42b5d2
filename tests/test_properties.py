"""Property-based checks of input validation: whatever arrives (from the UI, the API or the CLI),
a config is either valid in every field or refused with a ConfigError that says what to change."""

import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pytest

from lora_demo.core.config import (DATASETS, MODULES, ConfigError, LoraConfig, RunConfig, TrainConfig, clean_sentences,
                              limits, parse_layers, parse_ranks, parse_samples, parse_seeds)

anything = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                     st.lists(st.integers(-5, 100), max_size=3))
names = st.one_of(st.sampled_from(MODULES), st.text(max_size=6))
settings.register_profile("lora-lab", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("lora-lab")


@given(rank=anything, alpha=anything, targets=st.one_of(st.lists(names, max_size=5), st.text(max_size=12)),
       side=st.one_of(st.sampled_from(["both", "encoder", "decoder"]), st.text(max_size=6)),
       layers=st.one_of(st.none(), st.text(max_size=6), st.tuples(anything, anything)), dropout=anything)
def test_lora_config_is_valid_or_refused_with_a_config_error(rank, alpha, targets, side, layers, dropout):
    try:
        cfg = LoraConfig(rank=rank, alpha=alpha, targets=targets, side=side, layers=layers, dropout=dropout)
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(cfg.rank, int) and 1 <= cfg.rank <= limits().max_rank
    assert math.isfinite(cfg.alpha) and 0 < cfg.alpha <= 4096
    assert cfg.targets and set(cfg.targets) <= set(MODULES)
    assert cfg.side in ("both", "encoder", "decoder") and 0 <= cfg.dropout <= 0.9
    assert cfg.layers is None or (0 <= cfg.layers[0] <= cfg.layers[1])


@given(steps=anything, batch_size=anything, lr=anything, train_size=anything, seed=anything,
       optimizer=st.one_of(st.sampled_from(["adamw", "lamb"]), st.text(max_size=6)))
def test_train_config_is_valid_or_refused_with_a_config_error(steps, batch_size, lr, train_size, seed, optimizer):
    try:
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, train_size=train_size, seed=seed,
                          optimizer=optimizer)
    except ConfigError as exc:
        assert str(exc)
        return
    lim = limits()
    assert 1 <= cfg.steps <= lim.max_steps and 1 <= cfg.batch_size <= lim.max_batch_size
    assert 0 < cfg.lr <= 1 and 1 <= cfg.train_size <= lim.max_train_size and 0 <= cfg.seed < 2**31


@given(st.one_of(st.text(max_size=40), st.lists(st.one_of(st.integers(-3, 300), st.text(max_size=3)), max_size=14)))
@example("0\x1f")   # str.strip() removes the unit separator, int() does not: once a ValueError, not a ConfigError
def test_rank_lists_parse_or_are_refused(text):
    try:
        ranks = parse_ranks(text)
    except ConfigError:
        return
    assert 1 <= len(ranks) <= 12 and all(1 <= r <= limits().max_rank for r in ranks)


@given(st.text(max_size=12))
def test_layer_ranges_parse_or_are_refused(text):
    try:
        layers = parse_layers(text)
    except ConfigError:
        return
    assert layers is None or 0 <= layers[0] <= layers[1]


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=3000))
def test_translate_text_is_cleaned_within_the_limits(text):
    lim = limits()
    try:
        lines, notices = clean_sentences(text)
    except ConfigError as exc:
        assert "at least one English sentence" in str(exc)
        assert not "".join(text.split()).translate(dict.fromkeys(range(32))).replace("\x7f", "")
        return
    assert 1 <= len(lines) <= lim.max_lines and sum(map(len, lines)) <= lim.max_text_chars
    assert all(line and line == line.strip() and not any(ord(ch) < 32 or ord(ch) == 127 for ch in line)
               for line in lines)
    assert (len(text) > lim.max_text_chars) == any("cut to" in n for n in notices)


@given(text=st.one_of(anything, st.text(alphabet="0123456789, -", max_size=24)))
def test_seed_lists_parse_or_are_refused(text):
    try:
        seeds = parse_seeds(text)
    except ConfigError as exc:
        assert str(exc)
        return
    assert 1 <= len(seeds) <= 8 and len(set(seeds)) == len(seeds) and min(seeds) >= 0


def test_seeds_samples_and_data_are_checked_with_a_message():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(3, first=5) == [5, 6, 7]
    for bad, message in (("1,1", "different"), ("a", "whole numbers"), (9, "between 1 and 8"), ("", "at least one")):
        with pytest.raises(ConfigError, match=message):
            parse_seeds(bad)
    assert parse_samples("  Hello   world \n\n Bye ") == ("Hello world", "Bye") and parse_samples("") == ()
    with pytest.raises(ConfigError, match="at most 5 sample sentences"):
        parse_samples("\n".join("abcdef"))
    with pytest.raises(ConfigError, match="at most 200 characters"):
        TrainConfig(samples=["x" * 201])
    with pytest.raises(ConfigError, match="data must be one of captions, news, europarl"):
        TrainConfig(data="books")
    with pytest.raises(ConfigError, match=f"between 1 and {DATASETS['news']}"):
        TrainConfig(data="news", train_size=DATASETS["news"] + 1)
    # a record written before the news data existed trained on Europarl, and reads back as such
    old = RunConfig().to_dict()
    del old["train"]["data"], old["train"]["samples"], old["train"]["heldout_size"], old["train"]["early_stop"]
    assert RunConfig.from_dict(old).train.data == "europarl"

