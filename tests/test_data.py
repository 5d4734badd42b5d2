"""The data loader reads the bundled WMT16 files and builds the prompt; batching is seeded."""

import gzip
import hashlib
import json

import numpy as np
import pytest

from lora_demo import data


@pytest.mark.parametrize("split,count,first_en", [
    ("train", 20000, "Resumption of the session"),
    ("validation", 2169, "India and Japan prime ministers meet in Tokyo"),
    ("test", 2999, "Obama receives Netanyahu"),
])
def test_bundled_splits_are_complete_and_in_order(split, count, first_en):
    pairs = data.load_pairs(split)  # HF_HUB_OFFLINE=1 (conftest): auto falls back to the bundled copy
    assert pairs.origin == "bundled" and len(pairs) == count
    assert pairs.items[0].en == first_en
    assert all(p.en and p.de for p in pairs.items)


def test_bundled_copy_is_byte_identical_to_the_shared_source():
    """The gzip in assets/ decompresses to the exact file whose sha256 SOURCE.md records."""
    with gzip.open(data.BUNDLED_DIR / "test.jsonl.gz", "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    assert digest == "cc79ceef25c33a6468020592e187904b9ef93d721e57d019bb3229b4f076dab0"
    assert "newstest2016" in (data.BUNDLED_DIR / "SOURCE.md").read_text()


def test_news_is_bundled_byte_identical_and_split_by_year():
    with gzip.open(data.BUNDLED_DIR / "news.jsonl.gz", "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    assert digest == "4266a4141d847f24d594a5dc06d1e2465753597855e46ba667669e1e271eac64"
    train = data.training_pairs("news", 20000)          # all of newstest2008-2010
    held = data.heldout_pairs("news", 500)
    base = data.news_pairs(data.NEWS_BASE_SETS)          # newstest2011-2013: the tiny base's news
    assert len(train) == data.NEWS_TRAIN_PAIRS == 7065 and len(held) == 500 and held.split == "newstest2014"
    assert len(base) == 9006 and train.split == "news: newstest2008-2010"
    assert train.items[0].en == "Food: Where European inflation slipped up"
    assert not {p.en for p in train.items} & {p.en for p in held.items}   # held out: never trained on
    assert not {p.en for p in base.items} & ({p.en for p in train.items} | {p.en for p in held.items})


def test_europarl_held_out_rows_are_never_training_rows():
    held = data.heldout_pairs("europarl", 500)
    assert len(held) == 500 and held.items[0] == data.load_pairs("train", source="bundled").items[19500]
    assert data.training_pairs("europarl", 19500).items[-1] == data.load_pairs("train", source="bundled").items[19499]
    with pytest.raises(ValueError, match="held out"):
        data.training_pairs("europarl", 19501)
    with pytest.raises(ValueError, match="bundled only"):
        data.load_pairs("news", 5, source="hub")


def test_prompt_and_limit():
    pairs = data.load_pairs("test", 5, source="bundled")
    assert len(pairs) == 5
    assert pairs.items[0].source == "translate English to German: Obama receives Netanyahu"
    assert pairs.items[0].de == "Obama empfängt Netanyahu"


def test_bad_split_and_source_are_refused():
    with pytest.raises(ValueError, match="split must be"):
        data.load_pairs("dev")
    with pytest.raises(ValueError, match="source must be"):
        data.load_pairs("test", source="web")


def test_hub_source_fails_loudly_offline():
    """The offline error itself: not an ImportError of datasets or pyarrow, which a bare Exception hid."""
    with pytest.raises(ConnectionError, match="OfflineModeIsEnabled"):
        data.load_pairs("test", 3, source="hub")


def test_the_locked_stack_imports_datasets_with_its_pyarrow_and_pandas():
    """pip's resolution of requirements.txt once pulled pyarrow 26, which needs NumPy 2 while TensorFlow 2.15
    needs NumPy 1: ``import datasets`` then failed. requirements.txt pins pyarrow below 22."""
    import datasets
    import numpy
    import pandas
    import pyarrow

    assert numpy.__version__.startswith("1."), numpy.__version__
    assert int(pyarrow.__version__.split(".")[0]) < 22, pyarrow.__version__
    table = pyarrow.table({"en": ["a"], "de": ["b"]})
    assert datasets.Dataset(table)[0] == {"en": "a", "de": "b"}
    assert pandas.DataFrame(table.to_pydict()).shape == (1, 2)


def test_encode_shapes_and_label_padding(bundled_tiny):
    tok = bundled_tiny.tokenizer
    pairs = data.load_pairs("train", 16, source="bundled")
    arr = data.encode(tok, pairs, max_source_len=64, max_target_len=48)
    assert arr["input_ids"].shape[0] == 16 and arr["input_ids"].shape[1] % 8 == 0
    assert arr["input_ids"].shape[1] <= 64 and arr["labels"].shape[1] <= 48
    assert arr["input_ids"].dtype == np.int32
    first = tok.decode(arr["input_ids"][0], skip_special_tokens=True)
    assert first.startswith("translate English to German:")
    assert np.all((arr["labels"] == -100) | (arr["labels"] >= 0))
    assert np.array_equal(arr["attention_mask"], (arr["input_ids"] != tok.pad_token_id).astype(np.int32))
    n_tgt = (arr["labels"][1] != -100).sum()
    assert arr["labels"][1][n_tgt - 1] == tok.eos_token_id


def test_batches_follow_the_seed_and_cover_the_data():
    arrays = {"x": np.arange(10)[:, None]}
    a = [b["x"].ravel().tolist() for b, _ in zip(data.batches(arrays, 5, seed=3), range(4))]
    b = [b["x"].ravel().tolist() for b, _ in zip(data.batches(arrays, 5, seed=3), range(4))]
    c = [b["x"].ravel().tolist() for b, _ in zip(data.batches(arrays, 5, seed=4), range(4))]
    assert a == b and a != c
    assert sorted(a[0] + a[1]) == list(range(10))  # one epoch = one permutation
    small = next(data.batches({"x": np.arange(3)[:, None]}, 8, seed=0))
    assert small["x"].shape == (8, 1)


def test_grouped_batches_follow_the_seed_cover_each_epoch_and_trim_to_their_longest_row(bundled_tiny):
    pairs = data.training_pairs("news", 200, source="bundled")
    arrays = data.encode(bundled_tiny.tokenizer, pairs, 64, 64)
    src, tgt = data.lengths(arrays)

    def epoch(seed):
        return [b for b, _ in zip(data.grouped_batches(arrays, 8, seed), range(25))]   # 200 rows = 25 batches
    a, b, c = epoch(3), epoch(3), epoch(4)
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(x["input_ids"].shape == y["input_ids"].shape and np.array_equal(x["input_ids"], y["input_ids"])
                   for x, y in zip(a, c))
    # every row exactly once per epoch: match rows by their token ids (the padded row, trimmed)
    rows = sorted(tuple(r[r != bundled_tiny.tokenizer.pad_token_id]) for x in a for r in x["input_ids"])
    assert rows == sorted(tuple(r[r != bundled_tiny.tokenizer.pad_token_id]) for r in arrays["input_ids"])
    widths = set()
    for x in a:
        s, t = data.lengths(x)
        assert x["input_ids"].shape[1] == max(8, -(-s.max() // 8) * 8) and x["labels"].shape[1] == max(8, -(-t.max() // 8) * 8)
        assert x["attention_mask"].shape == x["input_ids"].shape and x["input_ids"].shape[0] == 8
        widths.add(x["input_ids"].shape[1])
    assert len(widths) > 2   # the widths follow the rows, not the longest pair of the data
    real = src.sum() + tgt.sum()
    grouped = sum(x["input_ids"].size + x["labels"].size for x in a)
    padded = arrays["input_ids"].size + arrays["labels"].size
    assert 0 <= grouped - real < 0.5 * (padded - real), (real, grouped, padded)   # padding at least halved


def test_trimmed_fixed_batches_hold_the_same_tokens():
    ids = np.zeros((3, 24), np.int32)   # right-padded with 0 to 24: rows of 2, 9 and 1 tokens
    ids[0, :2], ids[1, :9], ids[2, :1] = [5, 6], range(5, 14), [5]
    arrays = {"input_ids": ids}
    arrays["attention_mask"] = (arrays["input_ids"] != 0).astype(np.int32)
    arrays["labels"] = np.where(arrays["attention_mask"] == 1, arrays["input_ids"], -100)
    out = data.fixed_batches(arrays, 2, 0, trimmed=True)
    assert [b["input_ids"].shape for b in out] == [(2, 16), (2, 8)]   # longest first, each to a multiple of 8
    assert sorted(int(t) for b in out for t in b["labels"][b["labels"] != -100]) == \
        sorted(int(t) for t in arrays["labels"][arrays["labels"] != -100])
    assert out[1]["attention_mask"][1].sum() == 0 and (out[1]["labels"][1] == -100).all()   # the filler row


def test_sources_are_jsonl_translation_objects():
    with gzip.open(data.BUNDLED_DIR / "validation.jsonl.gz", "rt", encoding="utf-8") as fh:
        row = json.loads(fh.readline())
    assert set(row["translation"]) == {"de", "en"}
