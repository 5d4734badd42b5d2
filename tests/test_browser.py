"""The app in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Loads the page of the suite's shared app (conftest.shared_app: micro) in a 1440 x 900 window, as a first-time
user meets it: the knobs, Train and Stop on the first screen; a default run whose live chart and sample
table share that screen with Train, and whose result card is there, unscrolled, when it ends. Then the
other tabs: a stopped run, base and LoRA side by side, inside the adapter, a method comparison, runs beside
each other; a shared link, the command line it prints, resume, duplicate and the report. Bad input in the
page is refused with one message naming the field and its range, nothing trains, and what was shown stays.
Screenshots go to artifacts/browser/. CI installs Chromium, so there this test must run; on a machine
without Chromium or Playwright it is skipped.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from lora_demo.core.config import DEFAULT_SAMPLES, LoraConfig
from lora_demo.core.params import preview

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "artifacts" / "browser"
VIEW = {"width": 1440, "height": 900}

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

if os.environ.get("CI") != "true" and (sync_playwright is None or not shutil.which(CHROMIUM)):
    pytest.skip("needs the playwright package and Debian's chromium", allow_module_level=True)


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])


def _on_first_screen(page, *selectors) -> dict:
    """Each selector's box, if it lies wholly inside the window with the page unscrolled; else its box and
    why not (what a first-time user sees without scrolling)."""
    return page.evaluate("""(sels) => {
        const out = {};
        for (const sel of sels) {
            const el = document.querySelector(sel);
            const r = el && el.getBoundingClientRect();
            out[sel] = !r ? 'missing' : (window.scrollY !== 0 ? 'scrolled' :
                (r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight && r.left >= 0 &&
                 r.right <= window.innerWidth) ? 'ok' : `off screen: ${Math.round(r.top)}-${Math.round(r.bottom)}`);
        }
        return out;
    }""", list(selectors))


def _trace_points(page, name_part: str) -> int:
    return page.evaluate("""(part) => {
        const el = document.querySelector('#loss-plot .js-plotly-plot');
        if (!el || !el.data) return 0;
        const t = el.data.find(t => (t.name || '').includes(part));
        return t && t.x ? t.x.length : 0;
    }""", name_part)


def _set(page, box: str, value) -> None:
    field = page.locator(f"{box} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def _open_more(page) -> None:
    if not page.locator("#steps").is_visible():
        page.locator("#more-settings").get_by_text("More settings").click()
        expect(page.locator("#steps")).to_be_visible()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


@pytest.mark.slow
def test_the_app_in_a_real_browser(shared_app, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    url = shared_app[0]
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport=VIEW)
        page.goto(url, wait_until="domcontentloaded")
        breakdown = page.locator("#breakdown")
        r8 = preview("micro", LoraConfig(rank=8)).trainable
        expect(breakdown).to_contain_text(f"{r8:,}", timeout=60_000)
        # one screen to learn on: the knobs, Train and Stop, without scrolling; nothing drawn empty; the whole
        # Train tab at most twice the window's height
        first = _on_first_screen(page, "#data", "#rank", "#targets", "#train-btn", "#stop-btn", "#breakdown",
                                 "#more-settings")
        assert set(first.values()) == {"ok"}, first
        assert page.locator("#loss-plot").is_hidden() and page.locator("#samples-table").is_hidden()
        assert page.evaluate("document.documentElement.scrollHeight") <= 2 * VIEW["height"]
        expect(page.locator("#more-settings")).to_contain_text("steps")   # the folded values show on its label
        page.screenshot(path=str(SHOTS / "1-first-screen.png"))

        # the rank slider: the breakdown follows, before any training
        r4 = preview("micro", LoraConfig(rank=4)).trainable
        _set(page, "#rank", 4)
        expect(breakdown).to_contain_text(f"{r4:,}", timeout=30_000)
        _set(page, "#rank", 8)
        expect(breakdown).to_contain_text(f"{r8:,}", timeout=30_000)

        # the default run: while it trains, Train, the live chart and the German of the sample sentences are on
        # the first screen; when it ends, its result card is, with a verdict per question
        page.locator("#train-btn").click()
        page.wait_for_function("""() => {
            const el = document.querySelector('#loss-plot .js-plotly-plot');
            const held = el && el.data && el.data.find(t => (t.name || '').startsWith('held-out'));
            return held && held.x && held.x.length >= 2;    // the base and the first evaluation
        }""", timeout=240_000)
        table = page.locator("#samples-table")
        expect(table).to_contain_text(re.compile(r"LoRA at step \d+"), timeout=60_000)
        expect(table).to_contain_text(DEFAULT_SAMPLES[0])
        running = _on_first_screen(page, "#train-btn", "#loss-plot", "#samples-table")
        wide = page.evaluate("""() => { const v = document.querySelector('#samples-table .virtual-table-viewport');
                                        return [v.scrollWidth, v.clientWidth]; }""")
        page.screenshot(path=str(SHOTS / "2-training.png"))
        assert set(running.values()) == {"ok"}, running
        assert wide[0] <= wide[1] + 2, wide          # every column fits: none is scrolled off to the right
        assert _trace_points(page, "smoothed") >= 2 and _trace_points(page, "each batch") >= 2
        card = page.locator("#result-card")
        expect(card).to_be_visible(timeout=300_000)
        for question in ("Did it learn what it trained on?", "Did the German get better?",
                         "Did it forget what the base knew?", "What did it cost?"):
            expect(card).to_contain_text(question)
        expect(card).to_contain_text(re.compile(r"\d+ s from start to result"))
        # the step-time note follows the runs: a finished run here replaces "once a run has finished"
        expect(page.locator("#cost-note")).to_contain_text(re.compile(r"took \d+ s|should take about \d+ s"),
                                                           timeout=30_000)
        assert _on_first_screen(page, "#result-card") == {"#result-card": "ok"}
        page.screenshot(path=str(SHOTS / "3-result-card.png"))
        page.locator("#details-box").get_by_text("Details").click()      # the statistics, one click away
        expect(page.locator("#details")).to_contain_text("paired bootstrap")

        # Stop: a long run ends as stopped, and its card says so
        _open_more(page)
        _set(page, "#steps", 2000)
        page.locator("#train-btn").click()
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('Training · step')",
                               timeout=240_000)
        page.locator("#stop-btn").click()
        expect(page.locator("#status")).to_contain_text("Stopped after", timeout=120_000)

        _translate_inspect_compare(page)
        _share_resume_duplicate_report(browser, url, shared_app[1], tmp_path)
        browser.close()


def _translate_inspect_compare(page) -> None:
    """Translate (base and LoRA side by side), Look inside (ΔW, what it learned and forgot), Compare runs
    (a method comparison grows its tables live), and runs beside each other with every column's changes
    highlighted."""
    _tab(page, "Translate")
    expect(page.locator("#translate-pick-note")).to_contain_text("The LoRA column uses run", timeout=30_000)
    page.locator("#en-text textarea").fill("A dog runs on the grass.\nTwo men are talking.")
    page.locator("#translate-btn").click()
    table = page.locator("#translations")
    expect(table).to_contain_text("A dog runs on the grass.", timeout=60_000)
    rows = [[table.locator(f"[data-testid=cell-{r}-{c}]").inner_text().strip() for c in range(3)] for r in range(2)]
    assert [r[0] for r in rows] == ["A dog runs on the grass.", "Two men are talking."], rows
    assert all(r[1] and r[2] for r in rows), rows          # a base and a LoRA German for each
    page.screenshot(path=str(SHOTS / "4-translated.png"), full_page=True)

    _tab(page, "Look inside")
    expect(page.locator("#inspect-pick input")).to_have_value(re.compile("r=8"), timeout=30_000)
    page.locator("#inspect-btn").click()
    page.wait_for_function("""() => {
        const el = document.querySelector('#delta-heatmap .js-plotly-plot');
        return el && el.data && el.data.some(t => t.type === 'heatmap');
    }""", timeout=60_000)
    expect(page.locator("#inspect-summary")).to_contain_text("effective rank", timeout=30_000)
    page.locator("#measure-btn").click()
    expect(page.locator("#measured")).to_contain_text("intruder dimensions", timeout=120_000)
    page.wait_for_function("""() => {                      // k = 1..8 for the r=8 run, once Plotly has drawn it
        const el = document.querySelector('#truncation .js-plotly-plot');
        return el && el.data && el.data.reduce((n, t) => n + (t.x ? t.x.length : 0), 0) === 8;
    }""", timeout=30_000)
    expect(page.locator("#measured")).to_contain_text("intruder dimensions")   # still this run's figures
    page.screenshot(path=str(SHOTS / "5-inside.png"), full_page=True)

    # Adapters: the stopped run is deleted (the suite's app keeps 4 runs per session; the comparison adds 3)
    _tab(page, "Adapters")
    expect(page.locator("#adapters-pick input")).to_have_value(re.compile("stopped"), timeout=30_000)
    page.locator("#delete-btn").click()
    expect(page.locator("#adapter-info")).to_contain_text("were deleted", timeout=30_000)

    _tab(page, "Train")
    _set(page, "#steps", 4)
    _set(page, "#bleu-size", 0)
    page.locator("#methods textarea").fill("lora,dora,full")
    page.locator("#methods-btn").click()
    expect(page.locator("#status")).to_contain_text("Method comparison", timeout=60_000)
    expect(page.locator("#status")).to_contain_text("run 3/3", timeout=300_000)
    expect(page.locator("#result-card")).to_be_visible(timeout=300_000)
    _tab(page, "Compare runs")
    groups = page.locator("#groups-table")
    expect(groups).to_contain_text("full fine-tuning", timeout=120_000)
    expect(groups).to_contain_text("dora · r=8")
    page.wait_for_function("""() => {
        const el = document.querySelector('#forgetting-plot .js-plotly-plot');
        const names = el && el.data ? el.data.map(t => t.name) : [];
        return ['lora', 'dora', 'full'].every(n => names.includes(n));
    }""", timeout=60_000)
    page.screenshot(path=str(SHOTS / "6-compare.png"), full_page=True)

    # the newest run (full fine-tuning) with the LoRA and DoRA runs beside it: five columns, and the changed
    # words highlighted in every run's column
    _tab(page, "Translate")
    for pick in ("^r=8 q\\+v · completed", "^dora r=8"):
        page.locator("#beside-pick input").click()
        page.get_by_role("option", name=re.compile(pick)).first.click()
    page.locator("#translate-btn").click()
    table = page.locator("#translations")
    expect(table).to_contain_text("full · ", timeout=60_000)
    expect(table).to_contain_text("dora r=8 · ")
    columns = [table.locator(f"[data-testid=cell-0-{c}]").inner_text().strip() for c in range(5)]
    assert columns[0] == "A dog runs on the grass." and all(columns), columns
    heads = page.locator(".diff th").all_inner_texts()
    assert len(heads) == 5 and heads[:2] == ["English", "Base"], heads
    for c in range(3):   # each run's cells hold its German, highlighted where it differs from the base
        cell = page.locator(f".diff tr:nth-child(2) td:nth-child({c + 3})")
        assert cell.inner_text().split() == columns[c + 2].split(), (c, cell.inner_text(), columns)
        if columns[c + 2].split() != columns[1].split():     # a run whose German differs is highlighted
            assert cell.locator("mark.changed").count() >= 1, (c, cell.inner_html())
    page.screenshot(path=str(SHOTS / "7-runs-side-by-side.png"), full_page=False)


def _number(page, box: str) -> str:
    return page.locator(f"{box} input[type=number]").input_value()


def _share_resume_duplicate_report(browser, url, app_dir, tmp_path):
    """A shared link restores the controls (nothing starts) and hides an instructor's choice of them; the
    copied link is the page's address; the command line it prints reproduces the page's run; the run goes
    on beyond its steps from its checkpoint; its settings are duplicated into the controls; and the report
    it hands in opens offline with its figures drawn."""
    ctx = browser.new_context(viewport=VIEW, permissions=["clipboard-read", "clipboard-write"])
    page = ctx.new_page()   # a new browser profile: a new session with no runs
    page.goto(url + "?rank=4&steps=8&bleu=0&seed=5&eval=4&ckpt=4&lr=0.005&targets=q,k,v&hide=optimizer,seed",
              wait_until="domcontentloaded")
    expect(page.locator("#share-note")).to_contain_text("Restored 8 setting(s)", timeout=60_000)
    _open_more(page)
    assert _number(page, "#rank") == "4" and _number(page, "#steps") == "8"
    expect(page.locator("#optimizer")).to_be_hidden()
    expect(page.locator("#seed")).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("Press ▶ Train")   # nothing started
    page.locator("#share").get_by_text("Share this setup").click()
    link = page.locator("#share-link textarea, #share-link input").first
    expect(link).to_have_value(re.compile(r"rank=4&.*targets=q,k,v.*&hide=optimizer,seed"), timeout=30_000)
    assert page.url == link.input_value()
    page.locator("#copy-link").click()
    page.wait_for_function("(want) => navigator.clipboard.readText().then(t => t === want)", arg=link.input_value())
    cli_box = page.locator("#cli-command textarea")
    expect(cli_box).to_have_value(re.compile("python -m lora_demo train .*--rank 4 --seed 5 .*--checkpoint-every 4"),
                                  timeout=30_000)
    line = cli_box.input_value().splitlines()[1]
    page.screenshot(path=str(SHOTS / "8-shared-link.png"), full_page=True)

    # Train, then the printed command line: the same losses
    page.locator("#train-btn").click()
    expect(page.locator("#result-card")).to_be_visible(timeout=180_000)
    record = max((json.loads(p.read_text()) for p in (app_dir / "runs").glob("*/metrics.json")),
                 key=lambda r: r["created"])
    assert record["config"]["lora"]["targets"] == ["q", "k", "v"] and record["config"]["train"]["seed"] == 5
    page.locator("#details-box").get_by_text("Details").click()
    expect(page.locator("#details")).to_contain_text("kept: step 4, 8")
    args = shlex.split(line)
    args[args.index("--out") + 1] = str(tmp_path / "cli-run")
    done = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    cli_losses = json.loads((tmp_path / "cli-run" / "metrics.json").read_text())["losses"]
    assert [s for s, _, _ in cli_losses] == [s for s, _, _ in record["losses"]] == list(range(1, 9))
    assert max(abs(a[1] - b[1]) for a, b in zip(cli_losses, record["losses"])) < 1e-5

    # Resume beyond the planned steps, from the checkpoint at the end
    expect(page.locator("#run-pick input")).to_have_value(re.compile(record["run_id"]), timeout=30_000)
    _set(page, "#resume-steps", 14)
    page.locator("#resume-btn").click()
    expect(page.locator("#details")).to_contain_text("resumed from its checkpoint at step 8", timeout=60_000)
    expect(page.locator("#details")).to_contain_text("completed · r=4 · seed 5 · step 14/14", timeout=180_000)
    assert _trace_points(page, "each batch") == 14
    page.screenshot(path=str(SHOTS / "9-resumed.png"))

    # Duplicate: the run's settings back into the controls after editing them
    _set(page, "#rank", 16)
    page.locator("#duplicate-btn").click()
    expect(page.locator("#status")).to_contain_text(f"settings of run {record['run_id']}", timeout=30_000)
    expect(page.locator("#rank input[type=number]")).to_have_value("4")
    assert _number(page, "#steps") == "14"   # as it now stands: resumed to 14 steps

    # The report: a download that opens with no network, its charts drawn by the plotly.js inside it
    _tab(page, "Compare runs")
    page.locator("#report-btn").click()
    with page.expect_download(timeout=60_000) as got:
        page.locator("#report-file a").first.click()
    path = tmp_path / "report.html"
    got.value.save_as(path)
    offline = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    view = offline.new_page()
    view.goto(path.as_uri())
    for fig in ("#report-curves", "#report-quality"):
        view.wait_for_function("(sel) => { const el = document.querySelector(sel); return el && el.data && "
                               "el.querySelector('.main-svg'); }", arg=fig, timeout=30_000)
    assert view.evaluate("document.querySelector('#report-curves').data.length") >= 3   # train, held-out, val
    text = view.locator("body").inner_text()
    for part in ("Comparison", "Parameter breakdown", "Budget", "Sample translations", "resumed from its checkpoint",
                 "Seeds and software", "tensorflow", record["run_id"]):
        assert part.lower() in text.lower(), part
    view.screenshot(path=str(SHOTS / "10-report.png"), full_page=True)
    offline.close()
    ctx.close()


@pytest.mark.slow
def test_bad_input_in_the_page_is_refused_with_one_message_and_changes_nothing(shared_app):
    """Out-of-range numbers typed into the page: one message under the control names the field and its range,
    the control keeps its value, Train pressed then starts nothing (once, saying so), and what the page showed
    stays as it was, with no error badges. An empty Translate box: one warning, the earlier translation stays."""
    url = shared_app[0]
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport=VIEW)
        page.goto(url, wait_until="domcontentloaded")
        expect(page.locator("#breakdown")).to_contain_text("Trains", timeout=60_000)
        records = shared_app[1] / "runs"

        def runs() -> int:   # every run the server has recorded, of any session
            return len(list(records.glob("*/metrics.json")))

        # a short run first, so there are results to keep
        _open_more(page)
        _set(page, "#steps", 3)
        _set(page, "#bleu-size", 0)
        page.locator("#train-btn").click()
        card = page.locator("#result-card")
        expect(card).to_be_visible(timeout=180_000)
        shown, before = card.inner_text(), runs()
        for box, typed, words in (("#rank", "0", "rank r must be from 1 to 64; 0 was refused"),
                                  ("#rank", "5000", "rank r must be from 1 to 64; 5000 was refused"),
                                  ("#steps", "99999999", "steps must be from 1 to 2000; 99999999 was refused")):
            kept = page.locator(f"{box} input[type=number]").input_value()
            _set(page, box, typed)
            message = page.locator(f"{box} .guard-msg")
            expect(message).to_have_count(1)
            expect(message).to_contain_text(words)
            page.locator("#train-btn").click()                         # held once: nothing starts
            expect(message).to_contain_text("Nothing was started")
            assert page.locator(f"{box} input[type=number]").input_value() == kept
            page.wait_for_timeout(1500)
            assert runs() == before and card.inner_text() == shown, (box, typed)
            assert page.locator(".toast-body").count() == 0             # no toasts: the one message is there
        assert page.locator(".error").count() == 0
        page.screenshot(path=str(SHOTS / "11-bad-input.png"))

        # a choice the server refuses (no target module): one warning naming the field, nothing starts
        checked = page.locator("#targets input[type=checkbox]:checked")
        ticked = checked.count()
        for _ in range(ticked):
            checked.first.uncheck()
        page.locator("#train-btn").click()
        toast = page.locator(".toast-body")
        expect(toast).to_have_count(1, timeout=30_000)
        expect(toast).to_contain_text("choose at least one target module")
        page.wait_for_timeout(1500)
        assert runs() == before and card.inner_text() == shown and page.locator(".error").count() == 0
        for name in ("q", "v"):
            page.locator("#targets").get_by_label(name, exact=True).check()
        expect(toast).to_have_count(0, timeout=30_000)                  # a warning goes by itself

        _tab(page, "Translate")
        page.locator("#en-text textarea").fill("A man is cooking.")
        page.locator("#translate-btn").click()
        table = page.locator("#translations")
        expect(table).to_contain_text("A man is cooking.", timeout=60_000)
        translated = table.inner_text()
        page.locator("#en-text textarea").fill("   ")
        page.locator("#translate-btn").click()
        expect(page.locator(".toast-body")).to_have_count(1, timeout=30_000)
        expect(page.locator(".toast-body")).to_contain_text("type at least one English sentence")
        page.wait_for_timeout(1000)
        assert table.inner_text() == translated and page.locator(".error").count() == 0
        assert runs() == before
        browser.close()
