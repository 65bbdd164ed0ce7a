"""Drives the status page in Debian's Chromium through Playwright, for tests/status_page.rs.

The Rust test owns Sluice (the real binary) and the readings; this script owns the browser.
They talk over pipes, one line at a time:

    script -> test (stdout):  @load on | @load off | @post <device_id> | @stop | @start
    test -> script (stdin):   ok | error <why>

Everything else this script says goes to stderr. It exits 0 when every check passed and 1
with a `FAIL:` line naming the check and what the page showed otherwise. Every wait is a
condition with a deadline; nothing sleeps to synchronise.

Usage: status_page.py --url http://127.0.0.1:PORT --artefacts DIR
"""

import argparse
import os
import sys
import time

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("SLUICE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 1000}
PHONE = {"width": 390, "height": 844}

# What the page shows, for failure messages.
DIAGNOSIS = """() => ({
  conn: document.getElementById('conn').dataset.state,
  banner_hidden: document.getElementById('banner').hidden,
  rate_total: document.getElementById('rate-total').dataset.value,
  devices: document.getElementById('device-count').dataset.value,
  recent: [...document.querySelectorAll('#recent-devices tbody tr')].map(r => r.dataset.device),
  tail_state: document.getElementById('tail-state').dataset.state,
  tail_filter: document.getElementById('tail-state').dataset.filter,
  tail: [...document.querySelectorAll('#tail li')].slice(0, 5).map(r => r.textContent),
})"""


class Failure(Exception):
    """A check failed; the message says which and what was seen."""


def log(msg):
    print(f"[browser] {msg}", file=sys.stderr, flush=True)


def ask(command):
    """Asks the Rust test to act on Sluice, and waits for it to be done."""
    print(f"@{command}", flush=True)
    answer = sys.stdin.readline().strip()
    if answer != "ok":
        raise Failure(f"the test could not `{command}`: {answer or 'no answer'}")


class Page:
    def __init__(self, page):
        self.page = page
        # Console errors, failed requests and error responses while Sluice is up.
        self.problems = []
        # JavaScript exceptions, at any time (a restart must not cause one either).
        self.exceptions = []
        self.watching = True
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.exceptions.append(f"uncaught exception: {e}"))
        page.on("requestfailed", self._request_failed)
        page.on("response", self._response)
        page.on("websocket", self._websocket)

    def _note(self, what):
        if self.watching:
            self.problems.append(what)

    def _console(self, msg):
        if msg.type == "error":
            self._note(f"console error: {msg.text}")

    def _request_failed(self, req):
        self._note(f"request failed: {req.method} {req.url}: {req.failure}")

    def _response(self, res):
        if res.status >= 400:
            self._note(f"{res.status} answer to {res.request.method} {res.url}")

    def _websocket(self, ws):
        ws.on("socketerror", lambda err: self._note(f"WebSocket {ws.url} error: {err}"))

    def wait(self, what, predicate, seconds, arg=None):
        """Waits until `predicate` (JS) is truthy, at most `seconds`."""
        try:
            self.page.wait_for_function(predicate, arg=arg, timeout=max(seconds, 0.05) * 1000)
        except PlaywrightTimeout:
            raise Failure(
                f"{what}: not within {seconds:.1f} s; the page shows {self.diagnosis()}"
            ) from None

    def diagnosis(self):
        try:
            return self.page.evaluate(DIAGNOSIS)
        except PlaywrightError as e:
            return f"(cannot read the page: {e})"

    def check_clean(self, phase):
        if self.problems or self.exceptions:
            raise Failure(
                f"{phase}: the page reported problems:\n  "
                + "\n  ".join(self.exceptions + self.problems)
            )


def attr_is(selector, attr, value):
    return (
        f"() => {{ const e = document.querySelector({selector!r});"
        f" return e !== null && e.getAttribute({attr!r}) === {value!r}; }}"
    )


def run(url, artefacts):
    os.makedirs(artefacts, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = Page(browser.new_page(viewport=DESKTOP))
            check(page, url, artefacts)
        finally:
            browser.close()


def check(p, url, artefacts):
    page = p.page

    # 1. The page loads, connects, draws its charts and opens the live tail, with no console
    # error and no failed request.
    page.goto(url + "/")
    p.wait("the page connects", attr_is("#conn", "data-state", "connected"), 10)
    p.wait("the device count is shown", attr_is("#device-count", "data-value", "0"), 10)
    p.wait("the live tail opens", attr_is("#tail-state", "data-state", "open"), 10)
    p.wait(
        "rates are shown (a second poll gives a window)",
        "() => document.getElementById('rate-total').dataset.value !== ''",
        10,
    )
    p.wait("four charts are drawn", "() => document.querySelectorAll('.uplot').length === 4", 5)
    p.check_clean("loading the page")
    log("loaded: connected, charts drawn, tail open, no console error, no failed request")

    # 2. Readings/s rises above 0 while load runs. Screenshots on a laptop and a phone.
    ask("load on")
    p.wait(
        "readings/s rises above 0 under load",
        "() => parseFloat(document.getElementById('rate-total').dataset.value) > 0"
        " && parseFloat(document.getElementById('rate-http').dataset.value) > 0",
        10,
    )
    log(f"under load: {p.diagnosis()['rate_total']} readings/s")
    page.screenshot(path=os.path.join(artefacts, "status-page.png"), full_page=True)
    page.set_viewport_size(PHONE)
    p.wait(
        "on a phone, nothing overflows sideways",
        "() => document.documentElement.scrollWidth <= window.innerWidth"
        " && [...document.querySelectorAll('.uplot')].every(u => u.getBoundingClientRect().right <= window.innerWidth)",
        3,
    )
    page.screenshot(path=os.path.join(artefacts, "status-page-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)
    ask("load off")
    p.check_clean("under load")

    # 3. A new device's reading shows in the device list and in the (filtered) live tail
    # within 3 s of its ack.
    page.fill("#tail-filter", "browser-*")
    p.wait(
        "the tail reopens with the filter",
        "() => { const e = document.getElementById('tail-state');"
        " return e.dataset.filter === 'browser-*' && e.dataset.state === 'open'; }",
        5,
    )
    device = f"browser-{int(time.time() * 1000)}"
    ask(f"post {device}")
    posted = time.monotonic()
    p.wait(
        f"{device} in the recently seen devices",
        f"() => document.querySelector('#recent-devices tr[data-device=\"{device}\"]') !== null",
        3,
    )
    p.wait(
        f"{device} in the live tail",
        f"() => document.querySelector('#tail li[data-device=\"{device}\"]') !== null",
        3 - (time.monotonic() - posted),
    )
    log(f"{device} shown in the device list and the tail {time.monotonic() - posted:.2f} s after its ack")
    others = page.evaluate(
        "() => [...document.querySelectorAll('#tail li[data-device]')]"
        ".map(li => li.dataset.device).filter(d => !d.startsWith('browser-'))"
    )
    if others:
        raise Failure(f"the tail filtered on browser-* shows other devices: {others[:5]}")
    p.check_clean("a new device")

    # 4. Sluice stops: the page says so. It starts again on the same port: the page recovers,
    # and the live tail streams again, with its filter.
    p.watching = False  # refused connections are expected from here on
    ask("stop")
    p.wait("the page shows it is disconnected", attr_is("#conn", "data-state", "disconnected"), 5)
    p.wait("the banner says disconnected", "() => !document.getElementById('banner').hidden", 1)
    p.wait("the tail shows it is closed", attr_is("#tail-state", "data-state", "closed"), 5)
    log("Sluice stopped: the page shows disconnected")
    ask("start")
    p.wait("the page reconnects", attr_is("#conn", "data-state", "connected"), 10)
    p.wait("the banner goes away", "() => document.getElementById('banner').hidden", 1)
    p.wait(
        "the tail reopens with its filter",
        "() => { const e = document.getElementById('tail-state');"
        " return e.dataset.filter === 'browser-*' && e.dataset.state === 'open'; }",
        5,
    )
    device = f"browser-after-{int(time.time() * 1000)}"
    ask(f"post {device}")
    p.wait(
        f"{device} in the live tail after the restart",
        f"() => document.querySelector('#tail li[data-device=\"{device}\"]') !== null",
        3,
    )
    p.wait(
        f"{device} in the recently seen devices after the restart",
        f"() => document.querySelector('#recent-devices tr[data-device=\"{device}\"]') !== null",
        3,
    )
    page.screenshot(path=os.path.join(artefacts, "status-page-after-restart.png"), full_page=True)
    log("Sluice restarted: the page reconnected and streams again")
    if p.exceptions:
        raise Failure("uncaught exceptions:\n  " + "\n  ".join(p.exceptions))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--artefacts", required=True)
    args = parser.parse_args()
    try:
        run(args.url.rstrip("/"), args.artefacts)
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    log("PASS")


if __name__ == "__main__":
    main()
