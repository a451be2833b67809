"""Headless Chromium for the tests that render HTML (the report, the MLflow UI link).

Without a browser those tests are skipped, unless DITSCALE_REQUIRE_CHROMIUM=1 (CI sets it, as it sets
DITSCALE_REQUIRE_SLURM=1 for the Slurm cluster): then a missing browser fails them, so CI cannot pass
with the browser checks silently skipped."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REQUIRE_ENV = "DITSCALE_REQUIRE_CHROMIUM"
NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_or_skip() -> str:
    """The browser's path; skips the test when there is none, fails it if DITSCALE_REQUIRE_CHROMIUM=1."""
    binary = find_chromium()
    if binary is None:
        problem = "chromium is not installed (Debian: apt-get install -y chromium)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {problem}")
        pytest.skip(problem)
    return binary


def keep_artifacts(folder: Path) -> None:
    """Copy `folder` under $DITSCALE_ARTIFACTS (CI keeps it) when that is set."""
    dest = os.environ.get("DITSCALE_ARTIFACTS")
    if dest:
        shutil.copytree(folder, Path(dest) / folder.name, dirs_exist_ok=True)


def keep_artifacts_file(path: Path) -> None:
    dest = os.environ.get("DITSCALE_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(dest) / path.name)


class CDP:
    """Chrome DevTools Protocol over --remote-debugging-pipe (fd 3: to the browser, fd 4: from it)."""

    def __init__(self, binary: str, profile: Path):

        def high(fd: int) -> int:  # move a child-side pipe end above 9, clear of fds 3 and 4
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            return moved

        self._to_r, self._to_w = os.pipe()
        self._from_r, self._from_w = os.pipe()
        self._to_r, self._from_w = high(self._to_r), high(self._from_w)
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--remote-debugging-pipe", "--window-size=1280,2000", "about:blank"]

        # the browser reads fd 3 and writes fd 4: let a shell put the pipe ends there
        shell = f'exec "$0" "$@" 3<&{self._to_r} 4>&{self._from_w} {self._to_r}<&- {self._from_w}>&-'
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile.parent / "chromium-stderr.log"  # a file, so a chatty browser never blocks on a pipe
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", shell, *args], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, pass_fds=(self._to_r, self._from_w))
        os.close(self._to_r)
        os.close(self._from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._from_r], [], [], left)
            if ready:
                chunk = os.read(self._from_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe: " + self.log.read_text(errors="replace")[-2000:])
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read_message(deadline)
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def open_page(self, url: str, viewport: tuple[int, int] | None = None) -> str:
        """A new tab (`viewport`: its width and height) that records Page, Runtime and Log events, at `url`
        once its load event fired; its session id, for evaluate."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        if viewport:
            self.send("Emulation.setDeviceMetricsOverride", {"width": viewport[0], "height": viewport[1],
                                                             "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired")
        return session

    def evaluate(self, session: str, expression: str):
        """The value of a JavaScript expression in the page of `session`."""
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         session=session)["result"]["value"]

    def images(self, session: str) -> list[tuple[str, bool]]:
        """(src, loaded) of every <img> of the page: loaded = complete with a non-zero natural width."""
        return [tuple(pair) for pair in json.loads(self.evaluate(session, (
            "JSON.stringify(Array.from(document.images).map(i => [i.getAttribute('src'), "
            "i.complete && i.naturalWidth > 0]))")))]

    def errors(self) -> list[dict]:
        """The events seen so far that report a page error: an uncaught exception, console.error or
        console.assert, an error-level log entry."""
        return [ev for ev in self.events if ev.get("method") == "Runtime.exceptionThrown"
                or (ev.get("method") == "Runtime.consoleAPICalled" and ev["params"]["type"] in ("error", "assert"))
                or (ev.get("method") == "Log.entryAdded" and ev["params"]["entry"]["level"] == "error")]

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)
