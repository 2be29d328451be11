"""Open an HTML page in headless Chromium and collect its console errors (shared test helper).

Speaks the Chrome DevTools protocol directly (``websocket-client``), so no browser download is
involved: the Debian ``chromium`` package (``ANGIOEXP_CHROMIUM`` or ``/usr/bin/chromium``) is
started once per test process with a fresh profile and ``--remote-debugging-port=0`` on
127.0.0.1; each page opens in a new tab, where uncaught exceptions, ``console.error`` calls and
browser log errors are collected while the page loads and its plots render; then a screenshot
is taken and the tab closed.

    errors = render(Path("index.html"), Path("shot.png"))
    assert errors == [] and plot_area_not_blank(Path("shot.png"))
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)


def chromium_path() -> str | None:
    """The Chromium binary to use, or None when there is none on this machine."""
    for candidate in (os.environ.get("ANGIOEXP_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class _Cdp:
    """A minimal DevTools-protocol session on one page target."""

    def __init__(self, ws_url: str, timeout: float):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg_id = self.next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(method)

    def pump(self, seconds: float, until: str | None = None) -> bool:
        """Collect events for up to ``seconds``; stop early on event ``until``. True if seen."""
        import websocket

        deadline = time.time() + seconds
        while time.time() < deadline:
            self.ws.settimeout(max(0.05, deadline - time.time()))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if "method" in msg:
                self.events.append(msg)
                if until and msg["method"] == until:
                    return True
        return False

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass


def _errors_from(events: list[dict]) -> list[str]:
    errors = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "exception")
            errors.append(f"uncaught: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
    return errors


class _Browser:
    """One headless Chromium for the whole test process: starting one costs seconds of CPU, so
    every ``render`` opens a fresh tab in it instead (its own console, closed afterwards)."""

    def __init__(self, binary: str, timeout: float):
        self.profile = Path(tempfile.mkdtemp(prefix="angioexp-chromium-"))
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = self.profile / "DevToolsActivePort"
            deadline = time.time() + timeout
            while not (port_file.exists() and port_file.read_text().strip()):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"chromium exited with code {self.proc.returncode} before DevTools was up")
                if time.time() > deadline:
                    raise TimeoutError("chromium did not open its DevTools port")
                time.sleep(0.1)
            self.base = f"http://127.0.0.1:{int(port_file.read_text().splitlines()[0])}"
        except BaseException:
            self.close()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def open_tab(self) -> dict:
        request = urllib.request.Request(f"{self.base}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)

    def close_tab(self, target_id: str) -> None:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{self.base}/json/close/{target_id}", timeout=10).close()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


_browser: _Browser | None = None


def close_browser() -> None:
    """Stop this process's Chromium, if one was started (at exit; tests/conftest.py also calls it
    when a pytest session ends, since xdist workers may not run exit handlers)."""
    global _browser
    if _browser is not None:
        _browser.close()
        _browser = None


atexit.register(close_browser)


def _shared_browser(timeout: float) -> _Browser:
    global _browser
    if _browser is None or not _browser.alive():
        binary = chromium_path()
        if binary is None:
            raise RuntimeError("no Chromium found (set ANGIOEXP_CHROMIUM or install the Debian 'chromium' package)")
        close_browser()
        _browser = _Browser(binary, timeout)
    return _browser


LATE_ERROR_SECONDS = 0.5
PLOTS_DRAWN = ("Array.from(document.querySelectorAll('.js-plotly-plot'))"
               ".every(gd => gd._fullLayout && gd.querySelector('svg.main-svg'))")


def _plots_drawn(cdp: _Cdp) -> bool:
    result = cdp.send("Runtime.evaluate", {"expression": PLOTS_DRAWN, "returnByValue": True})
    return result.get("result", {}).get("value") is True


def render(html_path: Path, screenshot_png: Path, *, width: int = 1280, height: int = 900,
           draw_timeout: float = 5.0, timeout: float = 60.0) -> list[str]:
    """Load ``html_path`` in a new headless-Chromium tab, save a screenshot, return its console errors."""
    browser = _shared_browser(timeout)
    tab = browser.open_tab()
    cdp = None
    try:
        cdp = _Cdp(tab["webSocketDebuggerUrl"], timeout)
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            cdp.send(domain)
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        cdp.send("Page.navigate", {"url": Path(html_path).resolve().as_uri()})
        if not cdp.pump(timeout, until="Page.loadEventFired"):
            raise TimeoutError(f"{html_path} did not finish loading in {timeout} s")
        # Plotly draws after the load event: wait until every plot has its SVG (at most
        # draw_timeout), then a moment more for late errors.
        deadline = time.time() + draw_timeout
        while time.time() < deadline and not _plots_drawn(cdp):
            cdp.pump(0.1)
        cdp.pump(LATE_ERROR_SECONDS)
        shot = cdp.send("Page.captureScreenshot", {"format": "png"}, timeout=timeout)
        Path(screenshot_png).parent.mkdir(parents=True, exist_ok=True)
        Path(screenshot_png).write_bytes(base64.b64decode(shot["data"]))
        return _errors_from(cdp.events)
    finally:
        if cdp is not None:
            cdp.close()
        browser.close_tab(tab["id"])


def plot_area_not_blank(png: Path, *, min_fraction: float = 0.02, min_colours: int = 16) -> bool:
    """True when the screenshot shows drawn content: enough non-white pixels and colours."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    inked = (np.abs(rgb - 255).sum(axis=2) > 60).mean()
    colours = len(np.unique(rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 200_000)], axis=0))
    return bool(inked >= min_fraction and colours >= min_colours)
