"""Screenshot the running app in headless Chromium after a short training run and a translation.

    python app.py --model tiny --port 7860 &
    python scripts/screenshot.py --url http://127.0.0.1:7860/ --out docs/img/screenshot.png

Uses Debian's /usr/bin/chromium through Playwright (no browser download).
"""

import argparse

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7860/")
    ap.add_argument("--out", default="docs/img/screenshot.png")
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--sweep", default="", help="ranks for a sweep (e.g. 2,8,32) instead of one run")
    a = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": a.width, "height": a.height})
        page.goto(a.url, wait_until="domcontentloaded")
        page.get_by_role("button", name="▶ Train").wait_for(timeout=60_000)
        if a.sweep:
            page.get_by_label("rank sweep: ranks").fill(a.sweep)
            page.get_by_role("button", name="Sweep ranks").click()
            n, last = len(a.sweep.split(",")), a.sweep.split(",")[-1].strip()
            page.get_by_text(f"Rank sweep {n}/{n}").first.wait_for(timeout=a.timeout * 1000)
            page.get_by_text(f"completed · r={last}").first.wait_for(timeout=a.timeout * 1000)
        else:
            page.get_by_role("button", name="▶ Train").click()
            page.get_by_text("completed · r=").first.wait_for(timeout=a.timeout * 1000)
        page.wait_for_timeout(4000)  # the run list refreshes every 3 s
        page.get_by_label("reference German, one line per sentence (optional: per-sentence chrF)").fill(
            "Das Wetter ist heute schön.")
        page.get_by_role("button", name="Translate", exact=True).click()
        page.get_by_text("LoRA = adapter of run").first.wait_for(timeout=120_000)
        page.wait_for_timeout(500)
        page.screenshot(path=a.out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
