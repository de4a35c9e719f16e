"""The demo in a real browser (Playwright driving Debian's Chromium): upload an image, ask, see the answer.

Set MMDLM_UPDATE_SCREENSHOT=1 to refresh docs/demo-screenshot.png (taken with the bundled shapes-tiny model)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package")

from mmdlm.demo.app import EXAMPLES_DIR, launch, load_examples  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_demo(browser, pipeline):
    """Serve the demo and open it; returns (demo, page, list of requests that left 127.0.0.1)."""
    demo = launch(pipeline=pipeline, port=free_port(), prevent_thread_lock=True, quiet=True)
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    page.goto(demo.local_url, wait_until="networkidle", timeout=TIMEOUT_MS)
    return demo, page, outside


def ask_in_chat(page, image: Path | None, question: str) -> None:
    if image is not None:
        page.locator("#chat-input input[type=file]").set_input_files(str(image))
    box = page.locator("#chat-input textarea")
    box.fill(question)
    box.press("Enter")


def test_chat_in_the_browser(browser, tiny_pipeline, tmp_path):
    expect = sync_api.expect
    demo, page, outside = open_demo(browser, tiny_pipeline)
    try:
        # A question without an image: a readable error toast, and the page keeps working.
        ask_in_chat(page, None, "what color is the circle?")
        expect(page.locator(".toast-body").first).to_contain_text("no image in the conversation", timeout=TIMEOUT_MS)

        image = EXAMPLES_DIR / "shapes_0.png"
        ask_in_chat(page, image, "what color is the circle?")
        expected = tiny_pipeline.chat([{"role": "user", "content": [
            {"type": "image", "image": str(image)}, {"type": "text", "text": "what color is the circle?"}]}])
        expect(page.locator("#chat-stats")).to_contain_text("forward passes", timeout=TIMEOUT_MS)
        bubbles = page.locator("#chatbot .message")
        expect(bubbles.last).to_contain_text(expected, timeout=TIMEOUT_MS)
        expect(page.locator("#chatbot img").first).to_be_visible()  # the uploaded image is in the conversation
        expect(page.locator("#canvas")).to_contain_text(expected)
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        assert (tmp_path / "demo.png").stat().st_size > 10_000
        assert outside == [], f"the page made outbound requests: {outside}"
    finally:
        page.close()
        demo.close()


def test_ask_tab_in_the_browser(browser, tiny_pipeline):
    expect = sync_api.expect
    demo, page, _ = open_demo(browser, tiny_pipeline)
    try:
        page.get_by_role("tab", name="Ask & caption").click()
        image = EXAMPLES_DIR / "shapes_3.png"
        page.locator("#ask-image input[type=file]").set_input_files(str(image))
        page.locator("#ask-question textarea").fill("what shape is the blue object?")
        page.locator("#ask-button").click()
        expect(page.locator("#ask-stats")).to_contain_text("forward passes", timeout=TIMEOUT_MS)
        expected = tiny_pipeline.answer(str(image), "what shape is the blue object?")
        expect(page.locator("#ask-answer textarea")).to_have_value(expected)
    finally:
        page.close()
        demo.close()


def test_demo_screenshot_with_the_trained_model(browser, shapes_tiny_pipeline, tmp_path):
    """The trained model answers an example in the browser; the screenshot goes to docs/ on request."""
    expect = sync_api.expect
    example = load_examples()["examples"][0]
    demo, page, outside = open_demo(browser, shapes_tiny_pipeline)
    try:
        ask_in_chat(page, Path(example["path"]), example["question"])
        expect(page.locator("#chat-stats")).to_contain_text("forward passes", timeout=TIMEOUT_MS)
        # An answer appears (its correctness is tested where shapes-tiny meets its reading targets).
        expect(page.locator("#chatbot .message").last).not_to_be_empty(timeout=TIMEOUT_MS)
        update = os.environ.get("MMDLM_UPDATE_SCREENSHOT") == "1"
        target = REPO / "docs" / "demo-screenshot.png" if update else tmp_path / "demo-screenshot.png"
        page.screenshot(path=str(target), full_page=False)
        assert target.stat().st_size > 10_000
        assert outside == []
    finally:
        page.close()
        demo.close()
