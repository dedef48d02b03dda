"""A real headless Chromium for the report tests, driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: commands on fd 3, replies on fd 4, NUL-separated JSON), so no
driver binary and no websocket library are needed. The network is closed: every flag below
keeps Chromium from trying to reach it.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--mute-audio",
         # keep data: iframes in the page's own renderer, so one session sees their DOM
         "--disable-site-isolation-trials")


class Chromium:
    def __init__(self, profile_dir, width: int = 1400, height: int = 1000, timeout: float = 60.0):
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed (apt-get install chromium)")
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, res_w)]   # clear of 3 and 4

        def child():
            os.dup2(hi[0], 3)
            os.dup2(hi[1], 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-pipe",
             f"--window-size={width},{height}", "about:blank"],
            close_fds=False, preexec_fn=child, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (cmd_r, res_w, *hi):
            os.close(fd)
        self.timeout, self._id, self._buf, self.events = timeout, 0, b"", []
        target = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.send("Page.enable", session=True)

    def send(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._res_r], [], [], left)[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def eval(self, expression: str, context: int | None = None):
        """Evaluate JavaScript in the page (or an execution context); return its JSON value."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context is not None:
            params["contextId"] = context
        r = self.send("Runtime.evaluate", session=True, **params)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}...: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, context: int | None = None):
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression, context)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for: {expression}")
            time.sleep(0.2)

    def open(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)
        self.wait_for("document.readyState === 'complete'")

    def frame_context(self, url_contains: str = "", timeout: float = 30.0) -> int:
        """An execution context inside the page's iframe once its URL contains url_contains
        and its document has loaded."""
        deadline = time.monotonic() + timeout
        while True:
            tree = self.send("Page.getFrameTree", session=True)["frameTree"]
            frames = [f["frame"] for f in tree.get("childFrames", []) if url_contains in f["frame"]["url"]
                      and f["frame"]["url"] != "about:blank"]
            if frames:
                ctx = self.send("Page.createIsolatedWorld", session=True, frameId=frames[0]["id"])["executionContextId"]
                if self.eval("document.readyState === 'complete'", ctx):
                    return ctx
            if time.monotonic() > deadline:
                raise TimeoutError(f"no iframe showing ...{url_contains}... loaded within {timeout} s")
            time.sleep(0.2)

    def screenshot(self, path) -> bytes:
        png = base64.b64decode(self.send("Page.captureScreenshot", session=True, format="png")["data"])
        with open(path, "wb") as f:
            f.write(png)
        return png

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._res_r):
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- what the report tests look for --------------------------------------------------------
# Inside a page: its tables, decoded images and audio players (metadata loaded, or failed).
PAGE_CONTENT = """(async () => {
  const audios = [...document.querySelectorAll('audio')];
  await Promise.all(audios.map(a => a.readyState >= 1 || a.error ? null
                                    : new Promise(r => { a.onloadedmetadata = r; a.onerror = r; })));
  return {title: document.querySelector('h2') ? document.querySelector('h2').textContent : '',
          tables: [...document.querySelectorAll('table')].map(t => t.id),
          rows: [...document.querySelectorAll('table#means tr')].slice(1).map(r => r.cells[0].textContent),
          images: document.images.length,
          decoded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
          audio: audios.length, seconds: audios.map(a => a.duration), errors: audios.filter(a => a.error).length};
})()"""


def link(text: str) -> str:
    return f"[...document.querySelectorAll('#app a')].find(a => a.textContent.trim() === {json.dumps(text)})"


def show_result(b: Chromium, category: str, k: int = 0) -> None:
    """In a Snakemake report: open a category from the menu and press the k-th result's view button."""
    if not b.eval(f"!!{link(category)}"):
        b.eval(f"{link('Results')}.click()")          # the breadcrumb back to the categories
    b.wait_for(f"!!{link(category)}")
    b.eval(f"{link(category)}.click()")
    b.wait_for(f"document.querySelectorAll('#app table tbody a[iconname=eye]').length > {k}")
    b.eval(f"document.querySelectorAll('#app table tbody a[iconname=eye]')[{k}].click()")
