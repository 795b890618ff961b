"""The live dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium, against a real ``carpool serve`` process.

The server runs the embedded model with 4 seats and a small KV cache behind an API key, so a
burst of requests both queues and fills blocks. The test logs in through the page's form (the
key never enters the URL), sends the burst with the ``openai`` client and reads the DOM while it
runs: the step timeline grows, running and waiting counts move, the KV map shows blocks in use,
then all blocks free once the burst ended. It saves a screenshot taken under load to
``$CARPOOL_DASHBOARD_SCREENSHOT`` (default: the test's tmp dir) and fails, naming the missing
piece, when the browser or selenium is absent (``make install`` installs both).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

API_KEY = "dash-test-key"
NUM_REQUESTS = 16
MAX_TOKENS = 160


def _browser_paths() -> tuple[str, str]:
    """The Chromium binary and its driver, or a failure that says how to install them."""
    browser = next(
        (p for n in ("chromium", "chromium-browser") if (p := shutil.which(n)) is not None), None
    )
    driver = shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", browser), ("chromium-driver", driver)) if p is None]
    if missing:
        pytest.fail(
            f"the dashboard browser test needs Debian's {' and '.join(missing)} "
            f"(apt-get install -y chromium chromium-driver; `make install` does it as root)",
            pytrace=False,
        )
    assert browser is not None and driver is not None
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """``carpool serve`` in its own process; yields its URL."""
    port = _free_port()
    cmd = [
        sys.executable, "-c", "from carpool.cli import main; main()", "serve",
        "--model", "embedded", "--port", str(port), "--api-key", API_KEY, "--max-num-seqs", "4",
        "--max-num-batched-tokens", "64", "--kv-cache-memory", "2MiB", "--log-interval", "60",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"carpool serve did not become healthy:\n{out[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, chromedriver = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"the dashboard browser test needs selenium (the dev extra): {e}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    # The reference screen: a 1280x800 viewport.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot_path(tmp_path: Path) -> Path:
    path = Path(os.environ.get("CARPOOL_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _read(driver: Any) -> dict[str, int]:
    """The figures the page shows now."""
    values = driver.execute_script(
        "const n = (id) => parseInt(document.getElementById(id).textContent, 10);"
        "return {running: n('num-running'), waiting: n('num-waiting'), kv: n('kv-used'),"
        " steps: n('steps-total'),"
        " bars: parseInt(document.getElementById('timeline').dataset.steps, 10),"
        " finished: document.querySelectorAll('#finished tbody tr').length};"
    )
    return {k: int(v) for k, v in values.items()}


def _wait_for(driver: Any, predicate: Any, timeout: float, what: str) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = _read(driver)
        if predicate(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard never showed {what}; last seen {seen}")
        time.sleep(0.1)


def test_dashboard_shows_the_batcher_at_work(served, browser, tmp_path) -> None:
    from openai import OpenAI

    driver = browser
    driver.get(f"{served}/dashboard")
    # The stream is under /v1: without the key the page asks for it (a form, not the URL).
    _wait_for_login_form(driver)
    driver.find_element("id", "key").send_keys(API_KEY)
    driver.find_element("id", "key").submit()
    deadline = time.monotonic() + 15
    while driver.find_element("id", "conn").text != "live":
        assert time.monotonic() < deadline, "the page never went live after logging in"
        time.sleep(0.1)
    assert API_KEY not in driver.current_url
    before = _wait_for(driver, lambda s: True, 5, "a frame")

    client = OpenAI(base_url=f"{served}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def one(i: int) -> int:
        r = client.completions.create(
            model="carpool-default",
            prompt=f"Request {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4),
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.usage.completion_tokens

    peak = {"running": 0, "waiting": 0, "kv": 0}
    shot = _screenshot_path(tmp_path)
    took_shot = False
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(NUM_REQUESTS)]
        while not all(f.done() for f in futures):
            seen = _read(driver)
            for k in peak:
                peak[k] = max(peak[k], seen[k])
            # A telling moment: seats full, a queue, and a few requests already done.
            busy = seen["running"] >= 3 and seen["waiting"] >= 1 and seen["finished"] >= 4
            if busy and not took_shot:
                driver.save_screenshot(str(shot))
                took_shot = True
            time.sleep(0.05)
        tokens = [f.result() for f in futures]
    assert tokens == [MAX_TOKENS] * NUM_REQUESTS

    assert peak["running"] >= 2, f"running never exceeded 1: {peak}"
    assert peak["waiting"] >= 1, f"no request was ever shown waiting (4 seats, 16 requests): {peak}"
    assert peak["kv"] >= 1, f"the KV map never showed blocks in use: {peak}"
    after = _wait_for(
        driver, lambda s: s["kv"] == 0 and s["running"] == 0 and s["waiting"] == 0, 15,
        "every KV block free and nothing running once the load ended",
    )  # fmt: skip
    assert after["steps"] > before["steps"], f"the step timeline did not grow: {before} {after}"
    assert after["bars"] > before["bars"], f"no step bars were drawn: {before} {after}"
    assert took_shot, f"no moment under load was caught for the screenshot (peaks {peak})"
    assert shot.stat().st_size > 10_000
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"the page logged errors: {errors}"


def _wait_for_login_form(driver: Any) -> None:
    deadline = time.monotonic() + 15
    while not driver.find_element("id", "key").is_displayed():
        assert time.monotonic() < deadline, "the page never asked for the API key"
        time.sleep(0.1)
