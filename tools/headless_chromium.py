"""Load a page in headless Chromium and report what a person would see: console errors, network requests that
leave the machine, where named elements are, and a full-page screenshot.

Talks the DevTools protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4, messages ended by NUL),
so it needs nothing beyond the standard library and a ``chromium`` binary. Used by tests/test_report.py, and
to make the README's screenshot (then quantized to 128 colours):

    sd3booth demo
    python tools/headless_chromium.py sd3booth-demo/run/report.html docs/report.png --width 1000 --height 1060
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@dataclass
class PageResult:
    png: bytes = b""
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    boxes: dict[str, list[float] | None] = field(default_factory=dict)  # selector -> [x, y, width, height]
    height: int = 0


class _Pipe:
    def __init__(self, binary: str, profile: str) -> None:
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()

        def fds() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
            r, w = os.dup(to_browser_r), os.dup(from_browser_w)  # copies above 3 and 4, whatever the pipes got
            os.dup2(r, 3)
            os.dup2(w, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(
            [binary, *flags], preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )  # close_fds would run after preexec_fn and close 3 and 4 again
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> Any:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        if any(e.get("method") == method for e in self.events):
            return
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


def _problems(events: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    errors, requests = [], []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            errors.append(f"load failed: {p.get('errorText')}")
    return errors, requests


_BOXES = """JSON.stringify({height: document.documentElement.scrollHeight, boxes: Object.fromEntries(%s.map(s => {
  const r = document.querySelector(s)?.getBoundingClientRect();
  return [s, r ? [r.x + scrollX, r.y + scrollY, r.width, r.height] : null]; }))})"""


def load_page(url: str, selectors: tuple[str, ...] = (), width: int = 1200, height: int | None = None,
              binary: str | None = None) -> PageResult:  # fmt: skip
    """Loads ``url``, waits for its load event, screenshots the whole page (or its first ``height`` pixels)."""
    binary = binary or find_chromium()
    if not binary:
        raise FileNotFoundError("no chromium binary on PATH")
    with tempfile.TemporaryDirectory() as profile:
        pipe = _Pipe(binary, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                pipe.send(f"{domain}.enable", session=s)
            metrics = {"width": width, "height": height or 900, "deviceScaleFactor": 1, "mobile": False}
            pipe.send("Emulation.setDeviceMetricsOverride", metrics, session=s)
            pipe.send("Page.navigate", {"url": url}, session=s)
            pipe.wait_for("Page.loadEventFired")
            found = pipe.send("Runtime.evaluate", {"expression": _BOXES % json.dumps(list(selectors)),
                                                   "returnByValue": True}, session=s)  # fmt: skip
            info = json.loads(found["result"]["value"])
            shot_h = min(info["height"], height) if height else info["height"]
            clip = {"x": 0, "y": 0, "width": width, "height": shot_h, "scale": 1}
            shot = pipe.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                             session=s)  # fmt: skip
            import base64

            errors, requests = _problems(pipe.events)
            return PageResult(base64.b64decode(shot["data"]), errors, requests, info["boxes"], info["height"])
        finally:
            pipe.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", help="HTML file or URL")
    ap.add_argument("png", help="screenshot to write")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, help="only the first HEIGHT pixels (default: the whole page)")
    a = ap.parse_args()
    url = a.page if "://" in a.page else Path(a.page).resolve().as_uri()
    result = load_page(url, width=a.width, height=a.height)
    Path(a.png).write_bytes(result.png)
    print(f"{a.png}: {len(result.png)} bytes; console errors: {result.errors or 'none'}")


if __name__ == "__main__":
    main()
