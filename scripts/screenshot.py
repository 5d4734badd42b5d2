"""Screenshot the running app in headless Chromium through the default run, as a first-time user meets it.

    python app.py --model tiny --port 7860 &
    python scripts/screenshot.py --url http://127.0.0.1:7860/ --out docs/img

Writes OUT/first-screen.png (the page before a run), OUT/training.png (the live chart and the German of the
sample sentences during the run), OUT/result-card.png (the verdicts after it) and OUT/screenshot.png (the
Translate tab, base beside LoRA). Uses Debian's /usr/bin/chromium through Playwright (no browser download).
"""

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HELD_OUT_DRAWN = """() => {
    const el = document.querySelector('#loss-plot .js-plotly-plot');
    const held = el && el.data && el.data.find(t => (t.name || '').startsWith('held-out'));
    return held && held.x && held.x.length >= %d;
}"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7860/")
    ap.add_argument("--out", default="docs/img", help="folder for the four images")
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the run")
    ap.add_argument("--sentences", default="A little girl is playing with a big dog.\nTwo men are working on a roof.",
                    help="what the Translate tab is given, one sentence per line")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    wait = a.timeout * 1000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": a.width, "height": a.height})
        page.goto(a.url, wait_until="domcontentloaded")
        page.locator("#train-btn").wait_for(timeout=60_000)
        page.locator("#breakdown").get_by_text("weights").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "first-screen.png"))

        page.locator("#train-btn").click()
        page.wait_for_function(HELD_OUT_DRAWN % 3, timeout=wait)     # the base and two evaluations
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "training.png"))

        page.locator("#result-card").wait_for(state="visible", timeout=wait)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "result-card.png"))

        page.get_by_role("tab", name="Translate").click()
        page.locator("#translate-pick-note").get_by_text("The LoRA column uses run").wait_for(timeout=30_000)
        page.locator("#en-text textarea").fill(a.sentences)
        page.locator("#translate-btn").click()
        page.locator("#translations [data-testid=cell-0-2]").wait_for(timeout=120_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "screenshot.png"))
        browser.close()
    print("\n".join(str(out / n) for n in ("first-screen.png", "training.png", "result-card.png", "screenshot.png")))


if __name__ == "__main__":
    main()
