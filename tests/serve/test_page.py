"""The playground page at `/` in a real headless chromium (selenium) against the real server (uvicorn in a
thread, tiny seeded Llama, two LoRA adapters): the select lists the models, the streamed answer equals the
server's non-streamed greedy completion and the offline generation, the metrics table counts the requests,
and server errors are shown in the page."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

import httpx  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from ._browser import (browser_paths, build_app, install_browser, offline_greedy, save_lora,  # noqa: E402
                       save_tiny_llama, serve, start_chrome)

PROMPT = "the red fox"
N = 12
GENERATION = ('endpoint="/v1/completions"', 'endpoint="/v1/chat/completions"')


@pytest.fixture(scope="session")
def chrome_paths():
    """chromium + chromedriver; installed with apt-get (the test set-up) when missing."""
    binary, driver = browser_paths()
    if binary and driver:
        return binary, driver
    if shutil.which("apt-get") is None:
        pytest.skip("chromium/chromedriver are missing and there is no apt-get to install them")
    return install_browser()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The server on a free port with adapters 'alpha' and 'beta', and an httpx client to it."""
    tmp = tmp_path_factory.mktemp("page")
    base = save_tiny_llama(tmp / "base")
    folders = {"alpha": save_lora(base, tmp / "alpha", 1, ["q_proj", "v_proj"]),
               "beta": save_lora(base, tmp / "beta", 2, ["q_proj", "v_proj", "down_proj"])}
    with serve(build_app(base, folders)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(url=url, client=client, base=base, folders=folders)


@pytest.fixture(scope="module")
def browser(chrome_paths):
    """A headless chromium, quit after the module."""
    driver = start_chrome(*chrome_paths)
    try:
        yield driver
    finally:
        driver.quit()


def by_id(driver, element_id: str):
    """The element with `element_id`."""
    return driver.find_element(By.ID, element_id)


def wait(driver, condition, seconds: float = 20.0):
    """Wait until `condition(driver)` is truthy; returns its value."""
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(condition)


def open_page(driver, url: str) -> None:
    """Load the page and wait until its first refresh filled the select and the adapter table."""
    driver.get(url + "/")
    wait(driver, lambda d: len(Select(by_id(d, "adapter")).options) > 0
         and d.find_elements(By.CSS_SELECTOR, "#adapters tr"))


def fill(driver, adapter: str, prompt: str, max_tokens: int, temperature: float = 0.0, chat: bool = False) -> None:
    """Fill the form the way a user does (select, typing) and press Send."""
    Select(by_id(driver, "adapter")).select_by_value(adapter)
    for field, value in (("prompt", prompt), ("max-tokens", str(max_tokens)), ("temperature", str(temperature))):
        box = by_id(driver, field)
        box.clear()
        box.send_keys(value)
    if by_id(driver, "chat").is_selected() != chat:
        by_id(driver, "chat").click()
    by_id(driver, "send").click()


def finished(driver) -> str:
    """Wait for the answer to end; returns the final state (done, error or stopped)."""
    return wait(driver, lambda d: (s := by_id(d, "output").get_attribute("data-state")) in ("done", "error",
                                                                                           "stopped") and s)


def metric_sum(text: str, name: str, only: tuple[str, ...] = ()) -> float:
    """Sum of the samples of `name` (restricted to lines containing one of `only`)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            if not only or any(o in line for o in only):
                total += float(line.split()[-1])
    return total


def cells(driver, row_id: str) -> tuple[str, str]:
    """(requests, tokens) texts of a row of the adapter table (data-adapter or the totals row id)."""
    row = (by_id(driver, row_id) if row_id == "adapters-total"
           else driver.find_element(By.CSS_SELECTOR, f'#adapters tr[data-adapter="{row_id}"]'))
    return row.find_element(By.CLASS_NAME, "requests").text, row.find_element(By.CLASS_NAME, "tokens").text


def test_the_streamed_answer_equals_the_greedy_completion_and_is_counted(site, browser):
    client = site.client
    open_page(browser, site.url)
    # the select and the table list exactly the models the server lists: the base, then both adapters
    listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert listed == ["base", "alpha", "beta"]
    assert [o.get_attribute("value") for o in Select(by_id(browser, "adapter")).options] == listed
    assert [r.get_attribute("data-adapter") for r in browser.find_elements(By.CSS_SELECTOR, "#adapters tr")] == listed
    for field, label in (("adapter", "Adapter"), ("prompt", "Prompt"), ("max-tokens", "Max tokens"),
                         ("temperature", "Temperature")):
        assert browser.find_element(By.CSS_SELECTOR, f'label[for="{field}"]').text == label
    before = int(cells(browser, "adapters-total")[0])

    fill(browser, "beta", PROMPT, N)
    assert finished(browser) == "done", by_id(browser, "error").text
    shown = by_id(browser, "output").get_property("textContent")
    assert not by_id(browser, "error").is_displayed()
    chunks = int(by_id(browser, "token-count").text)

    body = {"model": "beta", "prompt": PROMPT, "max_tokens": N, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    assert shown == whole["choices"][0]["text"] == offline_greedy(site.base, site.folders["beta"], PROMPT, N)
    assert shown.strip()
    # streamed: the text arrived in several chunks, never more than the tokens generated
    assert 1 < chunks <= whole["usage"]["completion_tokens"]
    # the adapter changed the answer, so the equality above checks that the page used it
    base = client.post("/v1/completions", json={**body, "model": "base"}).json()["choices"][0]["text"]
    assert base != shown

    # the table catches up with the server's counters (page request + two above) on its next refresh
    text = client.get("/metrics").text
    want = (metric_sum(text, "unipeft_requests_total", GENERATION), metric_sum(text, "unipeft_generated_tokens_total"))
    assert want[0] >= before + 3
    wait(browser, lambda d: cells(d, "adapters-total") == (f"{want[0]:g}", f"{want[1]:g}"), 10)
    # the server counts per model: beta's row shows its own requests and tokens
    per = [metric_sum(text, f"unipeft_model_{n}_total", ('model="beta"',)) for n in ("requests", "generated_tokens")]
    assert per[0] >= 2 and per[1] >= 2 * N - 2
    wait(browser, lambda d: cells(d, "beta") == (f"{per[0]:g}", f"{per[1]:g}"), 10)


def test_server_errors_are_shown_in_the_page(site, browser):
    client = site.client
    open_page(browser, site.url)
    # more new tokens than the 64-position context leaves: the server's 400 message appears in the page
    fill(browser, "alpha", PROMPT, 100)
    assert finished(browser) == "error"
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 100,
                                             "temperature": 0, "stream": True})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith("max_tokens:") and "context of 64 positions" in message
    box = by_id(browser, "error")
    assert box.is_displayed() and box.text == f"400: {message}"
    assert box.get_attribute("role") == "alert"
    assert by_id(browser, "output").get_property("textContent") == ""

    # chat on a tokenizer without a chat template: refused naming the field, the page shows it
    fill(browser, "base", PROMPT, 4, chat=True)
    assert finished(browser) == "error"
    assert box.text.startswith("400: messages:") and "has no chat template" in box.text

    # the next good request clears the error and streams again
    fill(browser, "alpha", PROMPT, 6, chat=False)
    assert finished(browser) == "done"
    assert not box.is_displayed()
    want = client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 6,
                                                "temperature": 0}).json()["choices"][0]["text"]
    assert by_id(browser, "output").get_property("textContent") == want
