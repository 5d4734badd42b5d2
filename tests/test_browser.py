"""The app in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Loads the page of the suite's shared app (conftest.shared_app: micro, short runs), moves the rank slider (the parameter breakdown
follows), trains (the loss chart draws the raw and smoothed train loss and the held-out curve, and the
sample table fills with the German of each evaluation point while the run goes), stops, and translates
(base and LoRA side by side). Screenshots of a
laptop-sized window go to artifacts/browser/. CI installs Chromium, so there this test must run; on a
machine without Chromium or Playwright it is skipped.
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

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

if os.environ.get("CI") != "true" and (sync_playwright is None or not shutil.which(CHROMIUM)):
    pytest.skip("needs the playwright package and Debian's chromium", allow_module_level=True)


def _points(page) -> int:
    """Training-loss points drawn in the live loss plot (read from the Plotly figure in the page)."""
    return page.evaluate("""() => {
        const el = document.querySelector('#loss-plot .js-plotly-plot');
        if (!el || !el.data) return 0;
        return el.data.filter(t => (t.name || '').toLowerCase().includes('train'))
                      .reduce((n, t) => n + (t.x ? t.x.length : 0), 0);
    }""")


def _trace_points(page, name_part: str) -> int:
    return page.evaluate("""(part) => {
        const el = document.querySelector('#loss-plot .js-plotly-plot');
        if (!el || !el.data) return 0;
        const t = el.data.find(t => (t.name || '').includes(part));
        return t && t.x ? t.x.length : 0;
    }""", name_part)


def _figure_points(page, selector: str) -> int:
    """Points drawn by every trace of the Plotly figure under ``selector``."""
    return page.evaluate("""(sel) => {
        const el = document.querySelector(sel + ' .js-plotly-plot');
        if (!el || !el.data) return 0;
        return el.data.reduce((n, t) => n + (t.x ? t.x.length : 0), 0);
    }""", selector)


@pytest.mark.slow
def test_the_app_in_a_real_browser(shared_app, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    url = shared_app[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(url, wait_until="domcontentloaded")
        breakdown = page.locator("#breakdown")
        r8 = preview("micro", LoraConfig(rank=8)).trainable
        expect(breakdown).to_contain_text(f"{r8:,} trainable", timeout=60_000)
        page.screenshot(path=str(SHOTS / "1-loaded.png"), full_page=True)

        # the rank slider: the breakdown follows, before any training
        r4 = preview("micro", LoraConfig(rank=4)).trainable
        rank_box = page.locator("#rank input[type=number]")
        rank_box.fill("4")
        rank_box.press("Enter")
        expect(breakdown).to_contain_text(f"{r4:,} trainable", timeout=30_000)

        # Train: the chart draws the raw and the smoothed train loss and the held-out curve, and the
        # sample table shows the German of the base model and of the adapter at each evaluation
        steps_box = page.locator("#steps input[type=number]")
        steps_box.fill("2000")
        steps_box.press("Enter")
        page.locator("#eval-options").get_by_text("Evaluation, early stopping").click()
        every = page.locator("#eval-every input[type=number]")
        every.fill("5")
        every.press("Enter")
        page.locator("#train-btn").click()
        page.wait_for_function("""() => {
            const el = document.querySelector('#loss-plot .js-plotly-plot');
            const held = el && el.data && el.data.find(t => (t.name || '').startsWith('held-out loss, newstest2014'));
            return held && held.x && held.x.length >= 4;    // base + 3 evaluations (step 15)
        }""", timeout=240_000)
        expect(page.locator("#status")).to_contain_text("running", timeout=10_000)
        assert _trace_points(page, "smoothed (EMA 0.9)") >= 15 and _trace_points(page, "each batch") >= 15
        table = page.locator("#samples-table")
        expect(table).to_contain_text("base model (step 0)", timeout=30_000)
        # the newest evaluation columns: step 15 or later, as the run has gone on meanwhile
        expect(table).to_contain_text(re.compile(r"LoRA at step (1[5-9]|[2-9]\d|\d{3,})\b"), timeout=30_000)
        expect(table).to_contain_text(DEFAULT_SAMPLES[0])
        # every column fits the table's width: the adapter's German is on screen, not scrolled off
        # to the right (without column widths the table was four times as wide as its panel)
        wide = page.evaluate("""() => { const v = document.querySelector('#samples-table .virtual-table-viewport');
                                        return [v.scrollWidth, v.clientWidth]; }""")
        assert wide[0] <= wide[1] + 2, wide
        live = _points(page)
        page.locator("#loss-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "2-training.png"), full_page=True)
        page.screenshot(path=str(SHOTS / "readme.png"))   # the README's: the curves and the German changing

        # Stop: the run ends as stopped, well before its 2000 steps
        page.locator("#stop-btn").click()
        expect(page.locator("#status")).to_contain_text("stopped", timeout=60_000)
        assert 15 <= live <= _points(page) < 4000   # two train traces: raw and smoothed

        # Translate: base and LoRA side by side
        page.locator("#en-text textarea").fill("The session is resumed.\nI thank the Commissioner.")
        page.locator("#translate-btn").click()
        table = page.locator("#translations")
        expect(table).to_contain_text("The session is resumed.", timeout=60_000)
        rows = [[table.locator(f"[data-testid=cell-{r}-{c}]").inner_text().strip() for c in range(3)]
                for r in range(2)]
        assert [r[0] for r in rows] == ["The session is resumed.", "I thank the Commissioner."], rows
        assert all(r[1] and r[2] for r in rows), rows          # a base and a LoRA German for each
        page.locator("#translations").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "3-translated.png"), full_page=True)
        # Inside the adapter: the stopped run's ΔW heatmap and spectra
        expect(page.locator("#inspect-pick input")).to_have_value(re.compile("r=4"), timeout=30_000)
        page.locator("#inspect-btn").click()
        page.wait_for_function("""() => {
            const el = document.querySelector('#delta-heatmap .js-plotly-plot');
            return el && el.data && el.data.some(t => t.type === 'heatmap');
        }""", timeout=60_000)
        expect(page.locator("#inspect-summary")).to_contain_text("effective rank", timeout=30_000)
        expect(page.locator("#inspect-summary")).to_contain_text("predicted", timeout=30_000)
        page.locator("#delta-heatmap").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "4-inside-the-adapter.png"), full_page=True)

        # What it learned and forgot: the scale curve, the truncation curve and intruder dimensions
        page.locator("#measure-btn").click()
        expect(page.locator("#measured")).to_contain_text("intruder dimensions", timeout=120_000)
        assert _figure_points(page, "#truncation") == 4        # k = 1..4 for the r=4 run
        assert _figure_points(page, "#run-forgetting") >= 5    # the scale curve's five points (+ the run)
        page.locator("#truncation").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "5-learned-and-forgot.png"))

        # Compare methods in one click: LoRA, DoRA and full fine-tuning, short runs
        for box, value in (("#steps", "4"), ("#bleu-size", "0")):
            field = page.locator(f"{box} input[type=number]")
            field.fill(value)
            field.press("Enter")
        page.locator("#methods textarea").fill("lora,dora,full")
        page.locator("#methods-btn").click()
        expect(page.locator("#status")).to_contain_text("Method comparison", timeout=60_000)
        expect(page.locator("#status")).to_contain_text("run 3/3", timeout=300_000)
        expect(page.locator("#status")).to_contain_text("completed", timeout=300_000)
        # The live tables grow from one group to three without a reload (Gradio 6.17's Dataframe showed only
        # the rows of its first update until reloaded; app.show_every_row mends it)
        expect(page.locator("#groups-table")).to_contain_text("full fine-tuning", timeout=120_000)
        expect(page.locator("#groups-table")).to_contain_text("dora · r=4")
        page.wait_for_function("""() => {
            const el = document.querySelector('#forgetting-plot .js-plotly-plot');
            const names = el && el.data ? el.data.map(t => t.name) : [];
            return ['lora', 'dora', 'full'].every(n => names.includes(n));
        }""", timeout=60_000)
        page.locator("#groups-table").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "6-methods.png"), full_page=False)
        page.locator("#forgetting-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "7-forgetting.png"), full_page=False)

        # Translate with runs beside: the newest run (full fine-tuning) with the LoRA and DoRA runs beside it,
        # five columns from the page
        for pick in ("^r=4 q\\+v · completed", "^dora r=4"):
            page.locator("#beside-pick input").click()
            page.get_by_role("option", name=re.compile(pick)).click()
        page.locator("#translate-btn").click()
        expect(table).to_contain_text("full · ", timeout=60_000)
        expect(table).to_contain_text("dora r=4 · ")
        columns = [table.locator(f"[data-testid=cell-0-{c}]").inner_text().strip() for c in range(5)]
        assert columns[0] == "The session is resumed." and all(columns), columns
        table.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "7b-runs-side-by-side.png"), full_page=False)
        _share_resume_duplicate_report(browser, url, shared_app[1], tmp_path)
        browser.close()


def _number(page, box: str) -> str:
    return page.locator(f"{box} input[type=number]").input_value()


def _share_resume_duplicate_report(browser, url, app_dir, tmp_path):
    """A shared link restores the controls (nothing starts) and hides an instructor's choice of them; the
    copied link is the page's address; the command line it prints reproduces the page's run; the run goes
    on beyond its steps from its checkpoint; its settings are duplicated into the controls; and the report
    it hands in opens offline with its figures drawn."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, permissions=["clipboard-read", "clipboard-write"])
    page = ctx.new_page()   # a new browser profile: a new session with no runs
    page.goto(url + "?rank=4&steps=8&bleu=0&seed=5&eval=4&ckpt=4&lr=0.005&targets=q,k,v&hide=optimizer,seed",
              wait_until="domcontentloaded")
    expect(page.locator("#share-note")).to_contain_text("Restored 8 setting(s)", timeout=60_000)
    assert _number(page, "#rank") == "4" and _number(page, "#steps") == "8"
    expect(page.locator("#optimizer")).to_be_hidden()
    expect(page.locator("#seed")).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("Press **Train**".replace("**", ""))   # nothing started
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
    page.locator("#share").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "8-shared-link.png"))

    # Train, then the printed command line: the same losses
    page.locator("#train-btn").click()
    expect(page.locator("#status")).to_contain_text("✅ completed", timeout=180_000)
    expect(page.locator("#status")).to_contain_text("kept: step 4, 8")
    record = max((json.loads(p.read_text()) for p in (app_dir / "runs").glob("*/metrics.json")),
                 key=lambda r: r["created"])
    assert record["config"]["lora"]["targets"] == ["q", "k", "v"] and record["config"]["train"]["seed"] == 5
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
    steps_to = page.locator("#resume-steps input[type=number]")
    steps_to.fill("14")
    steps_to.press("Enter")
    page.locator("#resume-btn").click()
    expect(page.locator("#status")).to_contain_text("resumed from its checkpoint at step 8", timeout=60_000)
    expect(page.locator("#status")).to_contain_text("✅ completed · r=4 · seed 5 · step 14/14", timeout=180_000)
    assert _trace_points(page, "each batch") == 14
    page.locator("#loss-plot").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "9-resumed.png"))

    # Duplicate: the run's settings back into the controls after editing them
    rank_box = page.locator("#rank input[type=number]")
    rank_box.fill("16")
    rank_box.press("Enter")
    page.locator("#duplicate-btn").click()
    expect(page.locator("#status")).to_contain_text(f"settings of run {record['run_id']}", timeout=30_000)
    expect(rank_box).to_have_value("4")
    assert _number(page, "#steps") == "14"   # as it now stands: resumed to 14 steps

    # The report: a download that opens with no network, its charts drawn by the plotly.js inside it
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
