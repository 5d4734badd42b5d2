"""The app in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Loads the page (the bundled offline model, tiny), moves the rank slider (the parameter breakdown
follows), trains (the loss chart draws the raw and smoothed train loss and the held-out curve, and the
sample table fills with the German of each evaluation point while the run goes), stops, and translates
(base and LoRA side by side). Screenshots of a
laptop-sized window go to artifacts/browser/. CI installs Chromium, so there this test must run; on a
machine without Chromium or Playwright it is skipped.
"""

import os
import re
import shutil

import pytest
from conftest import ROOT, launch

from lora_demo.config import LoraConfig
from lora_demo.params import preview

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


def test_the_app_in_a_real_browser(tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    proc, url = launch(tmp_path)   # the default model: offline it falls back to tiny, and the page says so
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url, wait_until="domcontentloaded")
            breakdown = page.locator("#breakdown")
            r8 = preview("tiny", LoraConfig(rank=8)).trainable
            expect(breakdown).to_contain_text(f"{r8:,} trainable", timeout=60_000)
            notice = page.locator(".notice").first
            expect(notice).to_contain_text("Could not load 'google/flan-t5-small'")
            expect(notice).to_contain_text("Running on the bundled offline model tiny instead")
            expect(notice).to_contain_text("--model")
            page.screenshot(path=str(SHOTS / "1-loaded.png"), full_page=True)

            # the rank slider: the breakdown follows, before any training
            r32 = preview("tiny", LoraConfig(rank=32)).trainable
            rank_box = page.locator("#rank input[type=number]")
            rank_box.fill("32")
            rank_box.press("Enter")
            expect(breakdown).to_contain_text(f"{r32:,} trainable", timeout=30_000)

            # Train: the chart draws the raw and the smoothed train loss and the held-out curve, and the
            # sample table shows the German of the base model and of the adapter at each evaluation
            steps_box = page.locator("#steps input[type=number]")
            steps_box.fill("2000")
            steps_box.press("Enter")
            page.locator("#eval-options").get_by_text("Evaluation, early stopping").click()
            every = page.locator("#eval-every input[type=number]")
            every.fill("10")
            every.press("Enter")
            page.locator("#train-btn").click()
            page.wait_for_function("""() => {
                const el = document.querySelector('#loss-plot .js-plotly-plot');
                const held = el && el.data && el.data.find(t => (t.name || '').startsWith('held-out loss, newstest2014'));
                return held && held.x && held.x.length >= 4;    // base + 3 evaluations
            }""", timeout=240_000)
            expect(page.locator("#status")).to_contain_text("running", timeout=10_000)
            assert _trace_points(page, "smoothed (EMA 0.9)") >= 30 and _trace_points(page, "each batch") >= 30
            table = page.locator("#samples-table")
            expect(table).to_contain_text("base model (step 0)", timeout=30_000)
            expect(table).to_contain_text("LoRA at step 30", timeout=30_000)
            expect(table).to_contain_text("The government has raised taxes on petrol.")
            live = _points(page)
            page.locator("#loss-plot").scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "2-training.png"), full_page=True)
            page.screenshot(path=str(SHOTS / "readme.png"))   # the README's: the curves and the German changing

            # Stop: the run ends as stopped, well before its 2000 steps
            page.locator("#stop-btn").click()
            expect(page.locator("#status")).to_contain_text("stopped", timeout=60_000)
            assert 30 <= live <= _points(page) < 4000   # two train traces: raw and smoothed

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
            expect(page.locator("#inspect-pick input")).to_have_value(re.compile("r=32"), timeout=30_000)
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
            assert _figure_points(page, "#truncation") == 32       # k = 1..32 for the r=32 run
            assert _figure_points(page, "#run-forgetting") >= 5    # the scale curve's five points (+ the run)
            page.locator("#truncation").scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "5-learned-and-forgot.png"))

            # Compare methods in one click: LoRA, DoRA and full fine-tuning, short runs
            for box, value in (("#steps", "12"), ("#bleu-size", "0"), ("#rank", "4")):
                field = page.locator(f"{box} input[type=number]")
                field.fill(value)
                field.press("Enter")
            page.locator("#methods textarea").fill("lora,dora,full")
            page.locator("#methods-btn").click()
            expect(page.locator("#status")).to_contain_text("Method comparison", timeout=60_000)
            expect(page.locator("#groups-table")).to_contain_text("full fine-tuning", timeout=300_000)
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
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
