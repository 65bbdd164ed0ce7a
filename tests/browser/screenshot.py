"""Takes the README's screenshot of the status page (docs/status-page.png), not a test.

Start a release Sluice and put it under load with sluice-sim first, then:

    ~/.cache/sluice/venv-browser/bin/python tests/browser/screenshot.py \
        --url http://127.0.0.1:8080 --out docs/status-page.png --history 90

It opens the page in Debian's Chromium at 1280 px wide, waits until readings/s is above 0,
lets the charts gather `--history` seconds of points, filters the live tail by `--tail`
(if given), and saves a full-page screenshot.
"""

import argparse

from playwright.sync_api import sync_playwright

from status_page import CHROMIUM, CHROMIUM_ARGS, DESKTOP


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--history", type=float, default=90, help="seconds of chart history")
    parser.add_argument("--tail", default="", help="device glob for the live tail")
    args = parser.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=DESKTOP)
        page.goto(args.url.rstrip("/") + "/")
        page.wait_for_function(
            "() => parseFloat(document.getElementById('rate-total').dataset.value) > 0",
            timeout=30_000,
        )
        if args.tail:
            page.fill("#tail-filter", args.tail)
        # Not synchronisation: the charts need this much history to show anything.
        page.wait_for_timeout(args.history * 1000)
        page.screenshot(path=args.out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
