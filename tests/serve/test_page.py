"""The web page in headless Chromium (Debian's `chromium`, driven by Playwright): type a prompt, see the text stream
in with each token marked by how it was committed, and the stats; the screenshot is kept as a test artifact."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serve_helpers import Server, tiny_model, tiny_tokenizer  # noqa: F401 (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("IDLM_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_streams_marked_tokens_and_stats(tiny_model):  # noqa: F811
    from playwright.sync_api import sync_playwright

    model, adapter = tiny_model
    server = Server("--model", str(model), "--adapter", str(adapter), "--decoding", "ar", "--kv-cache-tokens", "4096")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.select_option("#decoding", "risd")
            page.fill("#max_tokens", "40")
            page.fill("#prompt", "The quick brown fox")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".assistant .stats", timeout=60_000)
            marks = page.eval_on_selector_all(".assistant .text span", "els => els.map(e => e.className)")
            assert marks and set(marks) <= {"draft", "clean", "correction"}
            assert "correction" in marks or "draft" in marks  # R-ISD at work: drafts were verified
            stats = page.inner_text(".assistant .stats")
            assert "tokens/forward" in stats and "risd" in stats
            assert "tokens/forward" in page.inner_text("#live")
            assert page.inner_text(".user") == "The quick brown fox"
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)
            # a second turn keeps the conversation
            page.fill("#prompt", "And then?")
            page.press("#prompt", "Enter")
            page.wait_for_function("document.querySelectorAll('.assistant .stats').length == 2", timeout=60_000)
            assert not errors, errors
            browser.close()
    finally:
        assert server.stop() == 0, server.log
