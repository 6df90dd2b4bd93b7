"""The playground page in a real browser: Debian's chromium, headless, driven by Playwright (the PyPI package;
no browser download). Type a prompt, press Generate, watch the text stream in: it must be exactly the API's
completion for the same settings, and the page must fetch nothing from anywhere but this server. Chat with a
finetuned model: two turns, each answer the API's for the same conversation, and Stop keeps what came; a base
model's page disables the chat and says why.

    .venv/bin/python -m pytest tests/test_serve_browser.py   # needs /usr/bin/chromium (make test installs it)
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mirror_data import needs_mirror
from test_serve import server, slow_steps, tiny_hf_dir
from test_serve_chat import finetuned_run
from test_serve_chat import server as chat_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    needs_mirror,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(),
                       reason=f"no {CHROMIUM}: apt-get install chromium (make test does)"),
]


@pytest.fixture(scope="module")
def base_served(tmp_path_factory) -> Iterator[tuple[str, Any]]:
    with server(tiny_hf_dir(tmp_path_factory.mktemp("browser") / "tiny-gpt2")) as running:
        yield running


@pytest.fixture(scope="module")
def url(base_served) -> str:
    return base_served[0]


@pytest.fixture(scope="module")
def chat_served(tmp_path_factory) -> Iterator[tuple[str, Any]]:
    _, run = finetuned_run(tmp_path_factory.mktemp("browser-chat"))
    with chat_server(run) as running:
        yield running


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_the_playground_streams_a_completion(base_served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, app = base_served
    settings = {"temperature": "0.8", "top_k": "200", "top_p": "1", "max_tokens": "40", "seed": "3"}
    expected = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": "Once upon a time", "temperature": 0.8, "top_k": 200, "top_p": 1, "max_tokens": 40,
        "seed": 3,
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
            done = ("document.getElementById('stats').textContent.includes('tokens/s') && "
                    "!document.getElementById('stats').textContent.includes('…')")
            with slow_steps(app, 0.02):  # the stream spread over a second: a loaded machine still sees pieces
                page.click("#generate")
                page.wait_for_function(done, timeout=30000)
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


def test_a_base_models_page_disables_the_chat_and_says_why(url, browser):
    page = browser.new_context(bypass_csp=True).new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny-gpt2')")
    assert page.is_disabled("#tab-chat") and page.is_visible("#chat-note")
    assert "gptforge sft" in page.text_content("#chat-note")
    assert page.is_visible("#completion-view") and page.is_hidden("#chat-view")


def api_answer(url: str, messages: list[dict[str, str]], **options: Any) -> tuple[str, int]:
    """The API's answer to `messages`, and its tokens."""
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": messages, **options})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"], response.json()["usage"]["completion_tokens"]


DONE = ("document.getElementById('chat-stats').textContent.includes('tokens/s') && "
        "!document.getElementById('chat-stats').textContent.includes('…')")


def test_a_chat_round_trip(chat_served, browser, tmp_path):
    """Two turns with a system prompt: each streamed answer is the API's for the whole conversation so far
    (the page sends its history); Stop keeps the answer so far, and the chat goes on."""
    url, app = chat_served
    settings = {"temperature": 0.8, "top_k": 20, "top_p": 1, "seed": 3}
    page = browser.new_context(bypass_csp=True).new_page()
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url))
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny-chat')")
    assert page.is_enabled("#tab-chat") and page.is_hidden("#chat-note")
    page.click("#tab-chat")
    assert page.is_visible("#chat-view") and page.is_hidden("#completion-view")
    for name, value in {**settings, "max_tokens": 3}.items():
        page.fill(f"#{name}", str(value))
    page.fill("#system", "Be brief.")
    conversation = [{"role": "system", "content": "Be brief."}]
    for message in ("Thee?", "So"):  # the context is 32 tokens: short turns
        page.fill("#message", message)
        page.press("#message", "Enter")
        page.wait_for_function(DONE, timeout=30000)
        conversation.append({"role": "user", "content": message})
        expected, tokens = api_answer(url, conversation, max_completion_tokens=3, **settings)
        assert page.text_content("#history .turn.assistant:last-child .content") == expected
        assert page.text_content("#chat-stats").startswith(f"{tokens} tokens, ")  # the usage's exact count
        conversation.append({"role": "assistant", "content": expected})
    turns = page.query_selector_all("#history .turn")
    assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"] * 2
    assert page.input_value("#message") == ""
    # Stop: what came stays, as a stopped turn; the chat goes on from there
    page.click("#clear")
    page.fill("#system", "")
    page.fill("#max_tokens", "")  # as long as the context allows
    full, _ = api_answer(url, [{"role": "user", "content": "So"}], **settings)
    with slow_steps(app, 0.3):
        page.fill("#message", "So")
        page.click("#send")
        page.wait_for_function("document.querySelector('#history .turn.assistant .content')?.textContent")
        page.click("#chat-stop")
        page.wait_for_selector("#history .turn.assistant.stopped")
    stopped = page.text_content("#history .turn.assistant .content")
    assert stopped and full.startswith(stopped) and len(stopped) < len(full)
    assert page.is_enabled("#send") and page.is_disabled("#chat-stop")
    page.screenshot(path=str(tmp_path / "chat.png"))  # left for a look after a failure
    assert fetched and all(address.startswith(url) for address in fetched), fetched
