"""Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol on a pipe.

`--remote-debugging-pipe` makes Chromium read commands from fd 3 and write replies to fd 4,
each a JSON object ended by a NUL byte: no websocket client, no selenium/playwright. Used to
open the dashboard with its login cookie set the way a browser keeps it (HttpOnly,
SameSite=Strict), read the rendered DOM and take a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def find() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, binary: str, timeout: float = 60):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="tandem-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,900", "about:blank"]
        if os.geteuid() == 0:           # Chromium's sandbox refuses root; the page is our own, local
            args.insert(1, "--no-sandbox")
        self.log = Path(self.profile) / "chromium.log"
        # The pipe ends go to fds 3 (commands in) and 4 (replies out), where Chromium wants them
        # (bash: dash takes single-digit fd numbers only).
        shell = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", shell, "chromium", *args], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self.session = None

    # -- protocol ----------------------------------------------------------------------------

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline)
            if msg.get("method") == method:
                return msg.get("params", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer: {self.log.read_text()[-2000:]}")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited: {self.log.read_text()[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    # -- what the tests use ------------------------------------------------------------------

    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")

    def sign_in(self, base_url: str, token: str) -> None:
        """Through the dashboard's own login form, as a person would: type the token, submit;
        the server's Set-Cookie is then kept by the browser. (DevTools input, not page script:
        the page's CSP allows none.)"""
        self.load(base_url + "/login")
        fill = f"document.querySelector('input[name=token]').value = {json.dumps(token)};"
        self.send("Runtime.evaluate", {"expression": fill + " document.forms[0].requestSubmit()"})
        self.wait_event("Page.loadEventFired")

    def load(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def dom(self) -> str:
        root = self.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        return self.send("DOM.getOuterHTML", {"nodeId": root})["outerHTML"]

    def url(self) -> str:
        history = self.send("Page.getNavigationHistory")
        return history["entries"][history["currentIndex"]]["url"]

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.session = None
            self.send("Browser.close", session=False)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)

