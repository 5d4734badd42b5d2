"""WMT16 de-en pairs: from the hub when it is reachable, else the bundled copy.

Source text is ``PROMPT + English``; the target is the German. Training draws a
user-sized subset of the train split, validation loss uses a fixed slice of
newstest2015 and quality metrics a fixed held-out slice of newstest2016.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lora_demo import ASSETS
from lora_demo.core.hub import hub_reachable

log = logging.getLogger(__name__)

PROMPT = "translate English to German: "
HUB_DATASET = ("wmt/wmt16", "de-en")
BUNDLED_DIR = ASSETS / "wmt16_de_en"
# Multi30k (short image captions): what the bundled tiny base first learns to translate on.
MULTI30K_DIR = BUNDLED_DIR.parent / "multi30k_en_de"
MULTI30K_SPLITS = ("train", "validation", "test_2016_flickr")
SPLITS = ("train", "validation", "test", "news")
# The bundled news split (newstest2008-2014, not part of the hub's wmt16) by year: LoRA trains on
# 2008-2010, the bundled tiny base pre-trained on 2011-2013 (so it knows news words without having
# seen LoRA's pairs), and the held-out curve scores the first pairs of 2014, which neither saw.
NEWS_TRAIN_SETS = tuple(f"newstest{y}" for y in range(2008, 2011))
NEWS_BASE_SETS = tuple(f"newstest{y}" for y in range(2011, 2014))
NEWS_HELDOUT_SET = "newstest2014"
NEWS_TRAIN_PAIRS = 7065          # pairs in NEWS_TRAIN_SETS (tests/test_data.py counts them in the file)
NEWS_TRAIN_NAME = "news: newstest2008-2010"
EUROPARL_HELDOUT_START = 19500   # bundled train rows 19,500-19,999: never trained on (nor by the tiny base)
# Multi30k (WMT16 multimodal task 1): the bundled tiny base read every train caption German -> English and none
# English -> German (scripts/build_tiny.py, docs/data-and-models.md); LoRA's rows start after CAPTIONS_BASE_ROWS.
MULTI30K_TRAIN_ROWS = 29000
CAPTIONS_BASE_ROWS = 0           # Multi30k train rows the tiny base read English -> German


@dataclass(frozen=True)
class Lesson:
    """What a run learns from, and the slices it is measured on, by name (the page, the CLI and the
    records read them here)."""

    name: str
    label: str            # the page's choice
    train_pairs: int      # training pairs on offer, after the held-out slices
    train_name: str
    heldout_name: str     # the held-out curve: the training distribution, never trained on
    test_name: str        # BLEU/chrF after the run
    knew_name: str        # the second live curve: what the base already translated (forgetting)
    test_max: int         # pairs in the test slice's set, and in the second curve's
    knew_max: int
    why: str              # what the base saw, what LoRA trains on, and why: said on the page and by the CLI
    short: str = ""       # the same in a line or two, under the page's lesson picker


LESSONS = {
    "captions": Lesson(
        "captions", "captions: WMT16 multimodal task 1 (Multi30k)", MULTI30K_TRAIN_ROWS - CAPTIONS_BASE_ROWS,
        "multi30k train", "Multi30k validation", "Multi30k test_2016_flickr",
        f"Europarl rows {EUROPARL_HELDOUT_START:,}+", 1000, 500,
        "LoRA trains on image captions (Multi30k, the data of WMT16's multimodal task 1: short, formulaic "
        "German such as \"Ein Mann in einem blauen Hemd ...\"). The bundled base learned German from "
        "Europarl and news; it read every training caption German to English, and none English to German: "
        "it knows the caption words, not the caption translation. A narrow, systematic change that a "
        "minute of LoRA can teach. It is scored on test_2016_flickr, that task's "
        "2016 test set; the Europarl curve shows what it forgets of what the base knew.",
        "Image captions. The base knows German from Europarl and news, and the caption words, but has never "
        "translated a caption into German: a narrow change a minute of LoRA can teach. The Europarl curve "
        "shows what it forgets."),
    "news": Lesson(
        "news", "news (newstest2008–2010; held-out: newstest2014)", NEWS_TRAIN_PAIRS, NEWS_TRAIN_NAME,
        NEWS_HELDOUT_SET, "newstest2016", f"Europarl rows {EUROPARL_HELDOUT_START:,}+", 2999, 500,
        "LoRA trains on news (newstest2008-2010), a domain the base has met (newstest2011-2013) but cannot "
        "translate well: long sentences that a minute of LoRA barely moves.",
        "News, a domain the base met but translates poorly: long sentences a minute of LoRA barely moves."),
    "europarl": Lesson(
        "europarl", "Europarl (WMT16 train; held-out: rows 19,500+)", EUROPARL_HELDOUT_START, "train",
        f"europarl rows {EUROPARL_HELDOUT_START}+", "newstest2016", "newstest2015", 2999, 2169,
        "LoRA trains on Europarl, the parliament proceedings the bundled base learned most of its German from.",
        "Parliament proceedings, where the base learned most of its German: little left to learn."),
}
DEFAULT_LESSON = "captions"
# The one place these live: training pairs each dataset offers, and the name of its held-out slice.
TRAIN_PAIRS = {k: lesson.train_pairs for k, lesson in LESSONS.items()}
HELDOUT_NAMES = {k: lesson.heldout_name for k, lesson in LESSONS.items()}


REVERSE_PROMPT = "translate German to English: "


@dataclass(frozen=True)
class Pair:
    en: str
    de: str
    prompt: str = PROMPT   # ``en`` is the source and ``de`` the target whatever the prompt says

    @property
    def source(self) -> str:
        return self.prompt + self.en


def reversed_pairs(pairs: "Pairs") -> "Pairs":
    """The same sentences the other way, German -> English: the forgetting probe. A run trains only
    English -> German, so how its loss here moves from the base model's is what it forgot (or gained)."""
    return Pairs(tuple(Pair(p.de, p.en, REVERSE_PROMPT) for p in pairs.items), pairs.origin,
                 f"{pairs.split}, de→en")


@dataclass(frozen=True)
class Pairs:
    """A list of pairs and where it came from (shown in the UI and in metrics.json)."""

    items: tuple[Pair, ...]
    origin: str  # "hub" or "bundled"
    split: str

    def __len__(self) -> int:
        return len(self.items)


def _read_bundled(split: str, limit: int | None, sets: tuple[str, ...] | None = None,
                  folder: Path = BUNDLED_DIR) -> list[Pair]:
    path = folder / f"{split}.jsonl.gz"
    out: list[Pair] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            if sets is None or row.get("set") in sets:
                tr = row["translation"]
                out.append(Pair(en=tr["en"], de=tr["de"]))
    return out


def multi30k_pairs(split: str, limit: int | None = None) -> Pairs:
    """Bundled Multi30k pairs (assets/multi30k_en_de/SOURCE.md): "train", "validation" or
    "test_2016_flickr"."""
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"Multi30k split must be one of {MULTI30K_SPLITS}, got {split!r}")
    return Pairs(tuple(_read_bundled(split, limit, folder=MULTI30K_DIR)), "bundled", f"multi30k {split}")


def _read_hub(split: str, limit: int | None) -> list[Pair]:
    """The first ``limit`` rows of a hub split, streamed when the hub answers: ``split[:n]`` would download and
    prepare every split of wmt/wmt16 de-en first (827 MB to read 100 sentences). Offline, the local cache
    answers or nothing does. A whole split (``limit`` None) is downloaded."""
    import itertools

    import datasets  # imported lazily: it is slow to import and unused offline

    if limit is None:
        rows = datasets.load_dataset(*HUB_DATASET, split=split)
    elif hub_reachable():
        rows = itertools.islice(datasets.load_dataset(*HUB_DATASET, split=split, streaming=True), limit)
    else:   # offline: only a copy already in the local cache can answer (it cannot stream)
        rows = datasets.load_dataset(*HUB_DATASET, split=f"{split}[:{limit}]")
    return [Pair(en=r["translation"]["en"], de=r["translation"]["de"]) for r in rows]


def hub_cached() -> bool:
    """Does the local datasets cache hold wmt/wmt16 de-en (left by an earlier online load, or by
    scripts/hub_standin.py)? Offline, that copy is what ``datasets`` reads."""
    import os

    root = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "datasets")
    return any(Path(root, "wmt___wmt16", HUB_DATASET[1]).glob("*/*/dataset_info.json"))


def load_pairs(split: str, limit: int | None = None, source: str = "auto") -> Pairs:
    """First ``limit`` pairs of ``split``; ``source`` is "auto", "hub" or "bundled".

    "auto" reads the hub when it answers, or its copy in the local cache when it does not, and
    otherwise the bundled copy (the same rows: see assets/wmt16_de_en/SOURCE.md), with a log line.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source not in ("auto", "hub", "bundled"):
        raise ValueError(f"source must be auto, hub or bundled, got {source!r}")
    if split == "news":  # not on the hub as part of wmt16: always the bundled copy
        if source == "hub":
            raise ValueError("the news split (newstest2008-2014) is bundled only; use source='bundled' or 'auto'")
        return Pairs(tuple(_read_bundled(split, limit)), "bundled", split)
    if source == "hub" or (source == "auto" and (hub_reachable() or hub_cached())):
        try:
            return Pairs(tuple(_read_hub(split, limit)), "hub", split)
        except Exception as exc:  # network, cache or schema trouble: the bundled copy still works
            if source == "hub":
                raise
            log.warning("WMT16 from the hub failed (%s); using the bundled copy", exc)
    return Pairs(tuple(_read_bundled(split, limit)), "bundled", split)


def training_pairs(dataset: str, n: int, source: str = "auto") -> Pairs:
    """The first ``n`` training pairs of ``dataset``: "captions" (Multi30k train after the rows the base
    read, bundled on every path), "news" (newstest2008-2010, bundled) or "europarl" (the WMT16 train split,
    hub or bundled; its first rows are Europarl)."""
    if dataset == "captions":
        if n > TRAIN_PAIRS["captions"]:
            raise ValueError(f"at most {TRAIN_PAIRS['captions']:,} caption training pairs")
        rows = multi30k_pairs("train", CAPTIONS_BASE_ROWS + n).items[CAPTIONS_BASE_ROWS:]
        return Pairs(rows, "bundled", LESSONS["captions"].train_name)
    if dataset == "news":
        return news_pairs(NEWS_TRAIN_SETS, n, name=NEWS_TRAIN_NAME)
    if n > EUROPARL_HELDOUT_START:
        raise ValueError(f"at most {EUROPARL_HELDOUT_START} Europarl training pairs; the rest are held out")
    return load_pairs("train", n, source=source)


def news_pairs(sets: tuple[str, ...], n: int | None = None, name: str | None = None) -> Pairs:
    """The first ``n`` (default: every) bundled news pairs of the newstest ``sets``, in file order."""
    return Pairs(tuple(_read_bundled("news", n, sets=sets)), "bundled", name or "news: " + ", ".join(sets))


def heldout_pairs(dataset: str, n: int) -> Pairs:
    """A fixed held-out slice of the training distribution, never trained on: for "captions" the first
    ``n`` pairs of Multi30k validation, for "news" the first ``n`` pairs of newstest2014, for "europarl"
    bundled train rows from 19,500 (the same rows the hub serves there). None was seen by the bundled
    tiny model's pre-training."""
    if dataset == "captions":
        return Pairs(multi30k_pairs("validation", n).items, "bundled", HELDOUT_NAMES["captions"])
    if dataset == "news":
        return Pairs(tuple(_read_bundled("news", n, sets=(NEWS_HELDOUT_SET,))), "bundled", HELDOUT_NAMES["news"])
    rows = _read_bundled("train", EUROPARL_HELDOUT_START + n)[EUROPARL_HELDOUT_START:]
    return Pairs(tuple(rows), "bundled", HELDOUT_NAMES["europarl"])


@functools.lru_cache(maxsize=1)
def _references() -> dict[str, str]:
    rows = [*multi30k_pairs("validation").items, *multi30k_pairs("test_2016_flickr").items,
            *heldout_pairs("news", 3000).items]
    return {p.en: p.de for p in rows}


def reference(english: str) -> str:
    """The human German of a held-out sentence (Multi30k validation or test_2016_flickr, newstest2014), or ""."""
    return _references().get(" ".join(english.split()), "")


def pairs_for(split: str, n: int, dataset: str = DEFAULT_LESSON, source: str = "auto") -> Pairs:
    """What a run of ``dataset`` reads: "train" and "heldout"; "validation", the second live curve (what
    the base knew); and "test", scored with
    BLEU/chrF after the run (for captions Multi30k test_2016_flickr, else newstest2016). The second curve
    is held-out Europarl for the captions and news lessons, newstest2015 for the Europarl lesson."""
    if split == "train":
        return training_pairs(dataset, n, source)
    if split == "heldout":
        return heldout_pairs(dataset, n)
    if dataset in ("captions", "news") and split == "validation":   # (both forget Europarl, which the base knew)
        return Pairs(heldout_pairs("europarl", n).items, "bundled", LESSONS[dataset].knew_name)
    if dataset == "captions" and split == "test":
        return Pairs(multi30k_pairs("test_2016_flickr", n).items, "bundled", LESSONS["captions"].test_name)
    return load_pairs(split, n, source=source)


def stream_hub_train():
    """Iterate the full hub train split (4.5M pairs) without materialising it."""
    import datasets

    for row in datasets.load_dataset(*HUB_DATASET, split="train", streaming=True):
        yield Pair(en=row["translation"]["en"], de=row["translation"]["de"])


@dataclass(frozen=True)
class Stream:
    """Training pairs read as they are needed (``train()`` batches them on the fly), e.g. the
    full hub train split. ``pairs`` is a callable returning a fresh iterator."""

    pairs: Callable[[], Iterator[Pair]]
    origin: str
    split: str = "train"

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs())


def hub_stream() -> Stream:
    return Stream(stream_hub_train, "hub (streamed, full train split)")


def stream_batches(tokenizer, pairs: Iterable[Pair], batch_size: int, source_len: int, target_len: int,
                   seed: int, buffer: int = 4096, trimmed: bool = False):
    """Batches from a stream of pairs, each padded to exactly (source_len, target_len) so one
    compiled step serves them all, or with ``trimmed`` cut to its longest row (for a step traced for
    any length). A seeded shuffle buffer of ``buffer`` pairs mixes the order; memory stays bounded
    whatever the stream's length. Ends when the stream ends."""
    rng = np.random.default_rng(seed)
    pool: list[Pair] = []

    def batch(items):
        padded = pad_to(encode(tokenizer, items, source_len, target_len), source_len, target_len,
                        tokenizer.pad_token_id)
        return trim(padded) if trimmed else padded

    for pair in pairs:
        pool.append(pair)
        if len(pool) >= buffer:
            picks = sorted(rng.choice(len(pool), batch_size, replace=False), reverse=True)
            yield batch([pool.pop(i) for i in picks])
    order = rng.permutation(len(pool))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield batch([pool[i] for i in order[start:start + batch_size]])


# ---------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------

def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


# A fast tokenizer sets its truncation on the Rust side for each call, which two threads at once (two
# training slots preparing their data, or a translation beside them) cannot share: "RuntimeError: Already
# borrowed". Every use of a tokenizer in the package holds this lock; tokenising is short.
TOKENIZER_LOCK = threading.RLock()


def decode(tokenizer, ids, n: int | None = None) -> list[str]:
    """The text of the first ``n`` rows of generated ids (all by default), special tokens dropped."""
    with TOKENIZER_LOCK:
        return [t.strip() for t in tokenizer.batch_decode(ids[:n], skip_special_tokens=True)]


def encode(tokenizer, pairs, max_source_len: int, max_target_len: int) -> dict[str, np.ndarray]:
    """Tokenise pairs into fixed-shape int32 arrays.

    Arrays are padded to the longest example (capped at the max lengths) rounded
    up to a multiple of 8, so one run keeps one shape and its step is traced once.
    Label padding is -100, which the loss ignores.
    """
    items = pairs.items if isinstance(pairs, Pairs) else tuple(pairs)
    with TOKENIZER_LOCK:
        src = tokenizer([p.source for p in items], max_length=max_source_len, truncation=True)["input_ids"]
        tgt = tokenizer([p.de for p in items], max_length=max_target_len, truncation=True)["input_ids"]
    s_len = min(max_source_len, _round_up(max(map(len, src)), 8))
    t_len = min(max_target_len, _round_up(max(map(len, tgt)), 8))
    n = len(items)
    input_ids = np.full((n, s_len), tokenizer.pad_token_id, np.int32)
    labels = np.full((n, t_len), -100, np.int32)
    for i, (s, t) in enumerate(zip(src, tgt)):
        input_ids[i, : len(s)] = s
        labels[i, : len(t)] = t
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != tokenizer.pad_token_id).astype(np.int32),
        "labels": labels,
    }


def pad_to(arrays: dict[str, np.ndarray], source_len: int, target_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad encoded arrays to at least the given lengths (so two sets can share one traced shape)."""
    def grow(a, n, fill):
        return a if a.shape[1] >= n else np.pad(a, ((0, 0), (0, n - a.shape[1])), constant_values=fill)
    return {"input_ids": grow(arrays["input_ids"], source_len, pad_id),
            "attention_mask": grow(arrays["attention_mask"], source_len, 0),
            "labels": grow(arrays["labels"], target_len, -100)}


def lengths(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Real (non-pad) source and target tokens of each row."""
    return arrays["attention_mask"].sum(1), (arrays["labels"] != -100).sum(1)


def trim(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the padding columns no row of the batch needs, keeping lengths multiples of 8 (so a
    run meets few distinct shapes). Rows are right-padded, so only padding is dropped."""
    src, tgt = lengths(batch)
    s, t = _round_up(int(src.max(initial=0)), 8), _round_up(int(tgt.max(initial=0)), 8)
    return {"input_ids": batch["input_ids"][:, :s], "attention_mask": batch["attention_mask"][:, :s],
            "labels": batch["labels"][:, :t]}


def fixed_batches(arrays: dict[str, np.ndarray], batch_size: int, pad_id: int,
                  trimmed: bool = False) -> list[dict[str, np.ndarray]]:
    """Batches of exactly ``batch_size`` rows; the last is filled with rows that have no target
    tokens, so a token-weighted loss over them is exact. Without ``trimmed`` they are in order and
    share one shape; with it the rows are ordered by length and each batch is trimmed to its
    longest row (a token-weighted sum does not depend on the order)."""
    n = len(arrays["input_ids"])
    if trimmed:
        src, tgt = lengths(arrays)
        order = np.argsort(-(src + tgt), kind="stable")
        arrays = {k: v[order] for k, v in arrays.items()}
    out = []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
        missing = batch_size - len(batch["input_ids"])
        if missing:
            fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
            batch = {k: np.concatenate([v, np.full((missing,) + v.shape[1:], fill[k], v.dtype)])
                     for k, v in batch.items()}
        out.append(trim(batch) if trimmed else batch)
    return out


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int):
    """Endless shuffled batches; the order is a pure function of ``seed``.

    Every epoch is a fresh permutation from one seeded generator, so two runs
    with the same seed (e.g. a rank sweep) see exactly the same data order.
    """
    n = len(next(iter(arrays.values())))
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if n < batch_size:  # tiny subsets: repeat the permutation to fill a batch
            order = np.resize(order, batch_size)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield {k: v[idx] for k, v in arrays.items()}


GROUP = 32   # batches per length group: rows are sorted by length within groups of GROUP batches


def grouped_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int, group: int = GROUP):
    """Endless shuffled batches of rows of similar length, each trimmed to its longest row.

    Each epoch is a fresh permutation (from one seeded generator, so the order is a pure function of
    ``seed``), cut into groups of ``group`` batches; within a group the rows are sorted by length and
    cut into batches, and the epoch's batches are then shuffled, so long and short batches mix.
    Every row is seen once per epoch, as in ``batches``. Padding falls from a fixed shape set by the
    longest pair of the whole subset to a few tokens per batch (as Hugging Face's group_by_length
    sampler does; it keeps the groups in order)."""
    n = len(arrays["input_ids"])
    src, tgt = lengths(arrays)
    size = src + tgt
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if n < batch_size:
            order = np.resize(order, batch_size)
        epoch = []
        for g in range(0, len(order), group * batch_size):
            part = order[g:g + group * batch_size]
            part = part[np.argsort(-size[part], kind="stable")]
            epoch += [part[s:s + batch_size] for s in range(0, len(part) - batch_size + 1, batch_size)]
        for i in rng.permutation(len(epoch)):
            yield trim({k: v[epoch[i]] for k, v in arrays.items()})
