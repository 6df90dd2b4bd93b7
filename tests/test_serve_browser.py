"""The playground page in a real browser: Debian's chromium, headless, driven by Playwright (the PyPI package;
no browser download). Type a prompt, press Generate, watch the text stream in: it must be exactly the API's
completion for the same settings, and the page must fetch nothing from anywhere but this server.

    .venv/bin/python -m pytest tests/test_serve_browser.py   # needs /usr/bin/chromium (make test installs it)
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mirror_data import needs_mirror
from test_serve import server, tiny_hf_dir

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = [
    needs_mirror,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no {CHROMIUM}: apt-get install chromium (make test does)"),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    with server(tiny_hf_dir(tmp_path_factory.mktemp("browser") / "tiny-gpt2")) as (url, _):
        yield url


def test_the_playground_streams_a_completion(url, tmp_path):
    from playwright.sync_api import sync_playwright

    settings = {"temperature": "0.8", "top_k": "200", "top_p": "1", "max_tokens": "40", "seed": "3"}
    expected = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": "Once upon a time", "temperature": 0.8, "top_k": 200, "top_p": 1, "max_tokens": 40, "seed": 3,
    }).json()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            # the page's Content-Security-Policy forbids eval, which Playwright's wait_for_function uses
            page = browser.new_context(bypass_csp=True).new_page()
            fetched: list[str] = []
            page.on("request", lambda request: fetched.append(request.url))
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny-gpt2')")
            page.fill("#prompt", "Once upon a time")
            for name, value in settings.items():
                page.fill(f"#{name}", value)
            # count the page's updates of the output while it streams
            page.evaluate("""() => {
                window.updates = 0;
                new MutationObserver(() => window.updates++).observe(
                    document.getElementById('output'), {childList: true, subtree: true, characterData: true});
            }""")
            page.click("#generate")
            page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s') && "
                                   "!document.getElementById('stats').textContent.includes('…')", timeout=30000)
            text = page.text_content("#completion")
            stats = page.text_content("#stats")
            updates = page.evaluate("window.updates")
            page.screenshot(path=str(tmp_path / "playground.png"))  # left for a look after a failure
        finally:
            browser.close()
    assert text == expected["choices"][0]["text"]
    assert updates > 10  # piece by piece, not in one go
    assert stats.startswith("40 tokens, ") and "ms to first token" in stats
    assert fetched and all(address.startswith(url) for address in fetched), fetched
