"""Save each plotly figure of a methods write-up (OUT/figures.html) as a PNG, in headless Chromium.

    python scripts/figures_png.py runs/methods/figures.html --out assets/ --prefix methods-

Uses Debian's /usr/bin/chromium through Playwright; the page is self-contained, so no network is used.
"""

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

NAMES = ["forgetting", "truncation", "intruders"]   # the order analysis.analyse_runs writes them in


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("html")
    ap.add_argument("--out", default="assets")
    ap.add_argument("--prefix", default="methods-")
    a = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(Path(a.html).resolve().as_uri())
        page.wait_for_selector(".js-plotly-plot")
        for name, fig in zip(NAMES, page.locator(".js-plotly-plot").all()):
            path = Path(a.out) / f"{a.prefix}{name}.png"
            fig.screenshot(path=str(path))
            print(f"wrote {path}")
        browser.close()


if __name__ == "__main__":
    main()
