"""Open an HTML page in headless Chromium and collect its console errors (shared test helper).

Speaks the Chrome DevTools protocol directly (``websocket-client``), so no browser download is
involved: the Debian ``chromium`` package (``ANGIOEXP_CHROMIUM`` or ``/usr/bin/chromium``) is
started with a fresh profile and ``--remote-debugging-port=0`` on 127.0.0.1; uncaught
exceptions, ``console.error`` calls and browser log errors are collected while the page loads
and its plots render; then a screenshot is taken.

    errors = render(Path("index.html"), Path("shot.png"))
    assert errors == [] and plot_area_not_blank(Path("shot.png"))
"""

from __future__ import annotations

import base64
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


def render(html_path: Path, screenshot_png: Path, *, width: int = 1280, height: int = 900,
           settle_seconds: float = 2.0, timeout: float = 60.0) -> list[str]:
    """Load ``html_path`` in headless Chromium, save a screenshot, return its console errors."""
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("no Chromium found (set ANGIOEXP_CHROMIUM or install the Debian 'chromium' package)")
    profile = Path(tempfile.mkdtemp(prefix="angioexp-chromium-"))
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {proc.returncode} before DevTools was up")
            if time.time() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = []
        while not targets:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                targets = [t for t in json.load(resp) if t.get("type") == "page"]
            if not targets:
                time.sleep(0.1)
        cdp = _Cdp(targets[0]["webSocketDebuggerUrl"], timeout)
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            cdp.send(domain)
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        cdp.send("Page.navigate", {"url": Path(html_path).resolve().as_uri()})
        if not cdp.pump(timeout, until="Page.loadEventFired"):
            raise TimeoutError(f"{html_path} did not finish loading in {timeout} s")
        cdp.pump(settle_seconds)  # plotly draws after load; late errors show up here
        shot = cdp.send("Page.captureScreenshot", {"format": "png"}, timeout=timeout)
        Path(screenshot_png).parent.mkdir(parents=True, exist_ok=True)
        Path(screenshot_png).write_bytes(base64.b64decode(shot["data"]))
        return _errors_from(cdp.events)
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def plot_area_not_blank(png: Path, *, min_fraction: float = 0.02, min_colours: int = 16) -> bool:
    """True when the screenshot shows drawn content: enough non-white pixels and colours."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    inked = (np.abs(rgb - 255).sum(axis=2) > 60).mean()
    colours = len(np.unique(rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 200_000)], axis=0))
    return bool(inked >= min_fraction and colours >= min_colours)
