"""The chat page (webui/) in headless Chromium against a real server (hypercorn llaisys.app:app).

Needs /usr/bin/chromium, /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver) and
selenium. Without them the tests skip, except when CI=true, where they fail.

Most tests run on a mock model whose logit_bias allows only a-z, space and '.', and never EOS: its
replies are readable, always run to max_tokens, and come at a few thousand tokens per second, so a
reply of several thousand tokens streams for a second or more. The XSS reply and the screenshot use
the real default model (marked slow).

LLAISYS_WEBUI_SCREENSHOT=path saves the laptop-size screenshot of a real conversation there
(docs/chat-page.png was made this way); otherwise it goes to the test's tmp_path.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from server_process import metric, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MOCK_ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
MOCK_VOCAB = 300

# What the markdown renderer may produce, and the attributes each element may carry.
ALLOWED_TAGS = {"P", "H1", "H2", "H3", "H4", "H5", "H6", "STRONG", "EM", "DEL", "CODE", "PRE", "A", "UL", "OL",
                "LI", "BLOCKQUOTE", "HR", "BR", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "DIV", "SPAN",
                "BUTTON"}
ALLOWED_ATTRS = {"class", "href", "target", "rel", "type", "title", "start", "style"}

HOSTILE = [
    "<script>window.__pwned = 1</script>",
    "<img src=x onerror=\"window.__pwned = 2\">",
    "<svg onload=\"window.__pwned = 3\"></svg>",
    "<iframe src=\"javascript:window.__pwned = 4\"></iframe>",
    "\"><img src=x onerror=window.__pwned=5>",
    "[click](javascript:window.__pwned=6)",
    "[click](JaVaScRiPt:window.__pwned=7)",
    "[click]( javascript:window.__pwned=8 )",
    "[click](data:text/html,<script>window.__pwned=9</script>)",
    "[click](https://example.com\" onmouseover=\"window.__pwned=10)",
    "[<img src=x onerror=window.__pwned=11>](https://example.com)",
    "![image](https://example.com/x.png\" onerror=\"window.__pwned=12)",
    "**<b onmouseover=window.__pwned=13>bold</b>** and *<i>em</i>* and ~~<s>x</s>~~",
    "`<script>window.__pwned=14</script>`",
    "```html\n<script>window.__pwned=15</script>\n<img src=x onerror=window.__pwned=15>\n```",
    "```\"><img src=x onerror=window.__pwned=16>\ncode\n```",
    "# <img src=x onerror=window.__pwned=17>\n## heading <script>x</script>",
    "- <img src=x onerror=window.__pwned=18>\n- [x](vbscript:msgbox)\n  1. <style>body{display:none}</style>",
    "> <iframe srcdoc=\"<script>parent.__pwned=19</script>\"></iframe>",
    "| a | <img src=x onerror=window.__pwned=20> |\n|---|---|\n| <script>x</script> | [y](javascript:z) |",
    "&lt;script&gt;window.__pwned=21&lt;/script&gt; &#60;img src=x onerror=window.__pwned=21&#62;",
    "https://example.com/<script>window.__pwned=22</script>",
    "<a href=\"javascript:window.__pwned=23\">link</a> <form action=x><input autofocus onfocus=window.__pwned=23>",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__pwned=24>",
    "\\<script>window.__pwned=25\\</script> <!-- comment --> <![CDATA[x]]>",
    "<details open ontoggle=window.__pwned=26>",
    "[a](https://ok.example/)[b](javascript:window.__pwned=27)",
    "**" * 200 + "<img src=x onerror=window.__pwned=28>" + "_" * 200,
    "[" * 100 + "<script>window.__pwned=29</script>" + "]" * 100 + "(https://x.example)",
    "> " * 60 + "<img src=x onerror=window.__pwned=30>",
    "  " * 40 + "- <img src=x onerror=window.__pwned=31>",
]


# ---------- browser and servers ----------

def _missing() -> list[str]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return missing


@pytest.fixture(scope="session")
def browser_available() -> None:
    missing = _missing()
    if missing:
        reason = (f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver; "
                  f"pip install selenium)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


def make_driver(width: int = 1280, height: int = 800, mobile: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="llaisys-webui-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.profile_dir = profile
    driver.set_script_timeout(30)
    set_viewport(driver, width, height, mobile)
    return driver


def set_viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    """The page's viewport: exactly width x height CSS pixels (--window-size counts the browser's own UI
    even headless), with a phone's touch-less mobile flag and 2x scale when mobile."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 2 if mobile else 1, "mobile": mobile})


@pytest.fixture
def driver(browser_available):
    d = make_driver()
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(d.profile_dir, ignore_errors=True)


def write_readable_mock(path: Path) -> Path:
    """A mock model that only says a-z, space and '.', and never ends before max_tokens."""
    from llaisys.models.mock import write_mock_model

    write_mock_model(path, vocab_size=MOCK_VOCAB)
    bias = [-1e4] * MOCK_VOCAB
    for ch in MOCK_ALPHABET:
        bias[ord(ch)] = 0.0
    config = json.loads((path / "config.json").read_text())
    config["logit_bias"] = bias
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def mock_server(browser_available, tmp_path_factory):
    model = write_readable_mock(tmp_path_factory.mktemp("webui-mock"))
    with running_server(model) as url:
        yield url


@pytest.fixture(scope="module")
def real_server(browser_available, default_model):
    with running_server(default_model) as url:
        yield url


def post_json(url: str, body: dict, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def model_id(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def api_reply(base_url: str, messages: list[dict], max_tokens: int) -> str:
    """The server's greedy reply to messages, asked directly (no browser)."""
    body = {"model": model_id(base_url), "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    return post_json(f"{base_url}/v1/chat/completions", body)["choices"][0]["message"]["content"]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


# ---------- the page, as a user drives it ----------

class ChatPage:
    def __init__(self, driver, base_url: str):
        self.d = driver
        self.base_url = base_url

    def open(self) -> "ChatPage":
        self.d.get(self.base_url + "/")
        wait_for(lambda: self.js("return !!window.llaisysChat"), message="the page's script")
        return self

    def reload(self) -> "ChatPage":
        self.d.refresh()
        wait_for(lambda: self.js("return !!window.llaisysChat"), message="the page's script after reload")
        return self

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def find(self, css: str):
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        from selenium.webdriver.common.by import By
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def settings(self, **values) -> None:
        """Type into the settings panel: system_prompt, temperature, top_p, max_tokens, api_key."""
        from selenium.webdriver.common.keys import Keys

        self.find("#settings-toggle").click()
        wait_for(lambda: self.find("#settings").is_displayed(), message="the settings panel")
        for name, value in values.items():
            field = self.find("#" + name.replace("_", "-"))
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(Keys.DELETE)
            field.send_keys(str(value))
        self.find("#settings-close").click()
        wait_for(lambda: not self.find("#settings").is_displayed(), message="the settings panel to close")

    def send(self, text: str) -> None:
        """Type text into the prompt (newlines with Shift+Enter) and send it with Enter."""
        from selenium.webdriver.common.keys import Keys

        n = len(self.find_all(".message.assistant"))
        prompt = self.find("#prompt")
        for k, line in enumerate(text.split("\n")):
            if k:
                prompt.send_keys(Keys.SHIFT, Keys.ENTER, Keys.SHIFT)  # Shift+Enter: a new line, not sent
            prompt.send_keys(line)
        assert prompt.get_attribute("value") == text
        prompt.send_keys(Keys.ENTER)
        wait_for(lambda: len(self.find_all(".message.assistant")) > n or self.find_all(".error"),
                 message="the reply to start")

    def busy(self) -> bool:
        return self.js("return !document.getElementById('stop').hidden || "
                       "!!document.querySelector('.message.assistant.pending')")

    def wait_idle(self, timeout: float = 60.0) -> None:
        wait_for(lambda: not self.busy(), timeout=timeout, message="the reply to finish")

    def reply_length(self) -> int:
        return self.js("var m = document.querySelectorAll('.message.assistant .content');"
                       "return m.length ? m[m.length - 1].textContent.length : -1")

    def stored(self) -> list[dict]:
        return json.loads(self.js("return localStorage.getItem('llaisys.conversations') || '[]'"))

    def current_messages(self) -> list[dict]:
        current = json.loads(self.js("return localStorage.getItem('llaisys.currentConversation')"))
        return next(c["messages"] for c in self.stored() if c["id"] == current)

    def texts(self, css: str) -> list[str]:
        return self.js("return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent)", css)

    def titles(self) -> list[str]:
        return self.texts(".conversation-item .conv-title")


def running_requests(base_url: str) -> float:
    return metric(base_url, "llaisys:num_requests_running")


def aborted_requests(base_url: str) -> float:
    """llaisys:request_success_total{finished_reason="abort"}."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("llaisys:request_success_total{") and 'finished_reason="abort"' in line)


# ---------- the markdown renderer ----------

RENDER_CHECK = """
const allowedTags = new Set(arguments[0]), allowedAttrs = new Set(arguments[1]), payloads = arguments[2];
const host = document.createElement('div');
document.body.appendChild(host);
const problems = [], texts = [];
for (const p of payloads) {
  const box = document.createElement('div');
  box.appendChild(window.llaisysRender(p));
  host.appendChild(box);  // in the live document: any handler or load would fire now
  texts.push(box.textContent);
  for (const e of box.querySelectorAll('*')) {
    if (!allowedTags.has(e.tagName)) problems.push([p, 'element ' + e.tagName]);
    for (const a of e.attributes) {
      if (!allowedAttrs.has(a.name)) problems.push([p, e.tagName + ' attribute ' + a.name]);
    }
    if (e.tagName === 'A' && !/^https?:\\/\\//.test(e.getAttribute('href') || ''))
      problems.push([p, 'link to ' + e.getAttribute('href')]);
    if (e.hasAttribute('style') && !/^text-align: (left|right|center);$/.test(e.getAttribute('style')))
      problems.push([p, 'style ' + e.getAttribute('style')]);
  }
}
return {problems: problems, texts: texts};
"""


def test_markdown_renderer_turns_hostile_markup_into_text(driver, mock_server):
    """Every payload renders to allowed elements only (no script/img/iframe/svg..., no on* attributes,
    links only http/https), the markup shows as literal text, and nothing it carries ever runs."""
    page = ChatPage(driver, mock_server).open()
    result = page.js(RENDER_CHECK, sorted(ALLOWED_TAGS), sorted(ALLOWED_ATTRS), HOSTILE)
    assert result["problems"] == []
    texts = dict(zip(HOSTILE, result["texts"]))
    assert "<script>window.__pwned = 1</script>" in texts[HOSTILE[0]]
    assert '<img src=x onerror="window.__pwned = 2">' in texts[HOSTILE[1]]
    assert "[click](javascript:window.__pwned=6)" in texts[HOSTILE[5]]
    assert "&lt;script&gt;" in texts[HOSTILE[20]]  # entities stay as typed, never decoded into markup
    time.sleep(0.5)  # give an injected image's onerror time to fire
    assert page.js("return window.__pwned") is None


def test_markdown_renderer_formats_replies(driver, mock_server):
    """The renderer's formatting: headings, emphasis, inline code, code blocks with a language label and a
    copy button, nested lists, quotes, tables, safe links; single newlines become line breaks."""
    page = ChatPage(driver, mock_server).open()
    sample = ("# Title\n\nSome **bold**, *italic*, ~~gone~~ and `a < b` in snake_case_name.\nnext line\n\n"
              "```python\ndef f(x):\n    return x * 2  # <b>\n```\n\n"
              "1. one\n2. two\n   - nested *em*\n\n> quoted\n\n| a | b |\n|:--|--:|\n| 1 | 2 |\n\n"
              "See [the docs](https://example.com/a_b) or https://example.org/x. and [bad](ftp://x).")
    html = page.js("const d = document.createElement('div'); d.appendChild(window.llaisysRender(arguments[0]));"
                   "return d.innerHTML", sample)
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong>" in html and "<em>italic</em>" in html and "<del>gone</del>" in html
    assert "<code>a &lt; b</code>" in html and "snake_case_name" in html
    assert "in snake_case_name.<br>next line" in html
    assert '<span class="code-lang">python</span>' in html and 'class="copy-code"' in html
    assert '<code class="language-python">def f(x):\n    return x * 2  # &lt;b&gt;</code>' in html
    assert "<ol><li>one</li><li>two<ul><li>nested <em>em</em></li></ul></li></ol>" in html
    assert "<blockquote><p>quoted</p></blockquote>" in html
    assert '<th style="text-align: left;">a</th>' in html and '<td style="text-align: right;">2</td>' in html
    assert '<a href="https://example.com/a_b" target="_blank" rel="noopener noreferrer nofollow">the docs</a>' in html
    assert '<a href="https://example.org/x" target="_blank" rel="noopener noreferrer nofollow">https://example.org/x</a>.' \
        in html
    assert "[bad](ftp://x)" in html


# ---------- conversations on the mock model ----------

def test_reply_streams_in_pieces_and_shows_stats(driver, mock_server):
    """A sent message's reply grows over several polls while it streams, ends equal to the server's own
    reply, and shows its token count, tokens/s and time to first token."""
    page = ChatPage(driver, mock_server).open()
    page.settings(temperature=0, max_tokens=4000)
    page.send("stream please")
    lengths = []
    while page.busy():
        lengths.append(page.reply_length())
        time.sleep(0.03)
    growing = sorted(set(n for n in lengths if n > 0))
    assert len(growing) >= 3, f"the reply did not stream: lengths seen {lengths}"
    assert page.find("#send").is_displayed() and not page.find("#stop").is_displayed()
    stored = page.current_messages()
    assert [m["role"] for m in stored] == ["user", "assistant"]
    expected = api_reply(mock_server, [{"role": "user", "content": "stream please"}], 4000)
    assert stored[1]["content"] == expected
    stats = page.find(".message.assistant .reply-stats").text
    assert "4000 tokens" in stats and "tok/s" in stats and "TTFT" in stats and "cut at max tokens" in stats
    assert page.texts(".message.user .content") == ["stream please"]


def test_stop_keeps_the_partial_reply_and_the_server_stops(driver, mock_server):
    """Stop aborts the fetch: the partial reply stays (marked stopped), it stops growing, and the server has
    no running request left."""
    page = ChatPage(driver, mock_server).open()
    page.settings(max_tokens=16000)
    aborted = aborted_requests(mock_server)
    page.send("a long one")
    wait_for(lambda: page.reply_length() > 300, message="some of the reply")
    assert running_requests(mock_server) == 1
    page.find("#stop").click()
    wait_for(lambda: not page.busy(), timeout=5, message="Stop to end the reply")
    wait_for(lambda: running_requests(mock_server) == 0, timeout=5, message="the server to drop the request")
    assert aborted_requests(mock_server) == aborted + 1
    length = page.reply_length()
    time.sleep(0.5)
    assert page.reply_length() == length
    reply = page.current_messages()[1]
    assert reply["stopped"] and 0 < len(reply["content"]) < 16000
    assert page.find_all(".message.assistant.stopped .stopped-tag")
    assert "~" in page.find(".message.assistant .reply-stats").text  # counted from pieces: no usage chunk
    # The page can go on: a short reply after the stopped one.
    page.settings(max_tokens=20)
    page.send("and a short one")
    page.wait_idle()
    assert len(page.current_messages()) == 4 and not page.current_messages()[3].get("stopped")


def test_conversations_survive_reload_rename_and_delete(driver, mock_server):
    """Two conversations (and the settings) are found again after a reload; one is renamed, the other deleted,
    and both changes survive another reload."""
    page = ChatPage(driver, mock_server).open()
    page.settings(max_tokens=24, temperature=0, system_prompt="Be brief.")
    page.send("first conversation")
    page.wait_idle()
    first_reply = page.current_messages()[1]["content"]
    page.find("#new-chat").click()
    assert page.find_all(".empty-state")
    page.send("second conversation")
    page.wait_idle()
    second_reply = page.current_messages()[1]["content"]
    assert len(first_reply) == len(second_reply) == 24

    page.reload()
    assert page.titles() == ["second conversation", "first conversation"]
    assert page.texts(".message.user .content") == ["second conversation"]
    assert page.find(".message.assistant .content").text == " ".join(second_reply.split())
    assert page.find("#max-tokens").get_attribute("value") == "24"
    assert page.find("#system-prompt").get_attribute("value") == "Be brief."

    page.find_all(".conversation-item .conv-title")[1].click()
    assert page.texts(".message.user .content") == ["first conversation"]
    assert page.current_messages()[1]["content"] == first_reply
    assert page.find("#chat-title").text == "first conversation"

    from selenium.webdriver.common.keys import Keys
    item = page.find(".conversation-item.active")
    item.find_element("css selector", ".conv-rename").click()
    field = page.find(".conv-rename-input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("Renamed chat", Keys.ENTER)
    assert page.titles() == ["second conversation", "Renamed chat"]
    assert page.find("#chat-title").text == "Renamed chat"

    second = page.find_all(".conversation-item")[0]
    second.find_element("css selector", ".conv-delete").click()
    page.find(".conv-delete-cancel").click()  # changing one's mind keeps it
    assert page.titles() == ["second conversation", "Renamed chat"]
    page.find_all(".conversation-item")[0].find_element("css selector", ".conv-delete").click()
    page.find(".conv-delete-confirm").click()
    assert page.titles() == ["Renamed chat"]

    page.reload()
    assert page.titles() == ["Renamed chat"]
    assert page.texts(".message.user .content") == ["first conversation"]
    assert [c["title"] for c in page.stored()] == ["Renamed chat"]


def test_edit_a_message_and_regenerate(driver, mock_server):
    """Editing an earlier user message drops everything after it and answers the edited conversation;
    Regenerate replaces the last answer with a new one."""
    page = ChatPage(driver, mock_server).open()
    page.settings(max_tokens=32, temperature=0)
    page.send("alpha")
    page.wait_idle()
    page.send("beta")
    page.wait_idle()
    assert [m["content"] for m in page.current_messages() if m["role"] == "user"] == ["alpha", "beta"]

    from selenium.webdriver.common.keys import Keys
    page.find_all(".message.user")[0].find_element("css selector", ".edit-message").click()
    field = page.find(".edit-input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("gamma")
    page.find(".edit-save").click()
    page.wait_idle()
    messages = page.current_messages()
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "gamma"
    # The request held only the edited message: the reply is the server's greedy answer to it alone.
    assert messages[1]["content"] == api_reply(mock_server, [{"role": "user", "content": "gamma"}], 32)
    assert page.texts(".message.user .content") == ["gamma"]

    before = messages[1]["content"]
    page.settings(temperature=1.5)
    page.find(".message.assistant .regenerate").click()
    page.wait_idle()
    messages = page.current_messages()
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert len(messages[1]["content"]) == 32 and messages[1]["content"] != before
    # Only the last answer offers Regenerate.
    page.send("delta\nepsilon")
    page.wait_idle()
    assert page.current_messages()[2]["content"] == "delta\nepsilon"
    assert len(page.find_all(".message.assistant .regenerate")) == 1
    assert page.find_all(".message.assistant")[-1].find_elements("css selector", ".regenerate")


def test_server_refusal_is_shown_with_its_message(driver, mock_server):
    """A request the server refuses (400: more tokens than the context) shows the status and the server's
    own message; nothing is kept as a reply, and Retry works once the setting is fixed."""
    page = ChatPage(driver, mock_server).open()
    page.settings(max_tokens=10**6)
    page.send("too long")
    error = wait_for(lambda: page.find_all(".error"), message="an error").pop()
    assert "400" in error.text and "maximum context length" in error.text
    assert [m["role"] for m in page.current_messages()] == ["user"]
    page.settings(max_tokens=8)
    page.find(".error .retry").click()
    page.wait_idle()
    assert not page.find_all(".error")
    assert [m["role"] for m in page.current_messages()] == ["user", "assistant"]


def test_api_key_errors_and_bearer_header(driver, browser_available, tmp_path):
    """With LLAISYS_API_KEY set: no key and a wrong key each show the 401 and point at the API key setting;
    the right key in Settings is sent as a bearer token and the reply comes."""
    model = write_readable_mock(tmp_path / "mock")
    with running_server(model, LLAISYS_API_KEY="secret") as url:
        page = ChatPage(driver, url).open()
        wait_for(lambda: "API key" in page.find("#server-status").text, message="the status to ask for a key")
        page.settings(max_tokens=8)
        page.send("hello?")
        error = wait_for(lambda: page.find_all(".error"), message="an error").pop()
        assert "401" in error.text and "API key" in error.text and "Settings" in error.text

        page.settings(api_key="wrong")
        page.find(".error .retry").click()
        wait_for(lambda: "not valid" in " ".join(page.texts(".error")), message="the wrong-key error")
        assert "401" in page.find(".error").text

        page.settings(api_key="secret")
        page.find(".error .retry").click()
        page.wait_idle()
        assert not page.find_all(".error")
        assert len(page.current_messages()[1]["content"]) == 8


def test_failure_mid_reply_and_a_lost_server(driver, browser_available, tmp_path):
    """A reply the server ends with an error event (its 1 s request timeout) keeps what arrived and shows the
    server's message under it; once the server is gone, sending says the server cannot be reached."""
    model = write_readable_mock(tmp_path / "mock")
    with running_server(model, LLAISYS_REQUEST_TIMEOUT="1") as url:
        page = ChatPage(driver, url).open()
        page.settings(max_tokens=16000)
        page.send("this takes too long")
        page.wait_idle(timeout=30)
        reply = page.current_messages()[1]
        assert 0 < len(reply["content"]) < 16000 and not reply.get("stopped")
        error = page.find(".message.assistant .error").text
        assert "failed during the reply" in error and "longer than the server's limit" in error
    page.settings(max_tokens=8)
    page.send("anyone there?")
    error = wait_for(lambda: page.find_all(".error.banner"), message="the network error").pop()
    assert "Could not reach the server" in error.text
    assert [m["role"] for m in page.current_messages()][-1] == "user"
    wait_for(lambda: "unreachable" in page.find("#server-status").text, message="the status to say so")


def test_phone_width_layout(driver, mock_server):
    """At 375 px the sidebar hides behind a button, nothing scrolls sideways, and the chat still works."""
    set_viewport(driver, 375, 812, mobile=True)
    page = ChatPage(driver, mock_server).open()
    page.settings(max_tokens=200)
    page.send("phone")
    page.wait_idle()
    assert page.js("return document.documentElement.scrollWidth") <= 375
    sidebar_right = lambda: page.js("return document.getElementById('sidebar').getBoundingClientRect().right")
    assert sidebar_right() <= 0
    page.find("#sidebar-toggle").click()
    wait_for(lambda: sidebar_right() > 200, message="the sidebar to slide in")
    assert page.find(".conversation-item").is_displayed()
    page.find("#new-chat").click()
    wait_for(lambda: sidebar_right() <= 0, message="the sidebar to hide again")
    assert page.find_all(".empty-state")


def test_tool_calls_in_a_reply_show_as_cards(driver, mock_server):
    """A reply holding Qwen2.5's tagged tool calls shows each as a card with its function's name and
    pretty-printed arguments, the surrounding text rendered as usual and no raw tag left."""
    page = ChatPage(driver, mock_server).open()
    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
             '<tool_call>{"name": "get_time", "arguments": {"zone": "<b>UTC</b>"}}</tool_call>')
    conversation = {"id": "c1", "title": "weather", "created": 1, "updated": 1, "messages": [
        {"role": "user", "content": "Weather and time?"}, {"role": "assistant", "content": reply}]}
    page.js("localStorage.setItem('llaisys.conversations', arguments[0]);"
            "localStorage.setItem('llaisys.currentConversation', JSON.stringify('c1'));", json.dumps([conversation]))
    page.reload()
    assert page.texts(".tool-call-name") == ["Tool call: get_weather", "Tool call: get_time"]
    args = page.texts(".tool-call-args")
    assert json.loads(args[0]) == {"city": "Paris"} and '"city": "Paris"' in args[0]  # indented, one key a line
    assert json.loads(args[1]) == {"zone": "<b>UTC</b>"} and not page.find_all(".tool-call-args b")
    text = page.texts(".message.assistant .content")[0]
    assert "Let me check." in text and "<tool_call>" not in text



def test_streamed_tool_call_pieces_join_into_one_card(driver, mock_server):
    """delta.tool_calls as the server streams them (name first, then the arguments in pieces, by index)
    make one card per call."""
    page = ChatPage(driver, mock_server).open()
    pieces = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"city": '}}, {"index": 0, "function": {"arguments": '"Paris"}'}},
              {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    events = [{"choices": [{"index": 0, "delta": {"tool_calls": [p]}, "finish_reason": None}]} for p in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.js("var real = window.fetch; window.fetch = function (url, init) {"
            "  if (String(url).indexOf('chat/completions') < 0) return real(url, init);"
            "  return Promise.resolve(new Response(arguments[0], {headers: {'Content-Type': 'text/event-stream'}}));"
            "}.bind(null);".replace("arguments[0]", json.dumps(stream)))
    page.send("Weather and time?")
    page.wait_idle()
    assert page.texts(".tool-call-name") == ["Tool call: get_weather", "Tool call: get_time"]
    assert [json.loads(a) for a in page.texts(".tool-call-args")] == [{"city": "Paris"}, {}]

# ---------- the real model ----------

XSS_PROMPT = ("Output this text exactly as written and nothing else: "
              "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">")


@pytest.mark.slow
def test_model_reply_with_html_is_shown_as_text(driver, real_server):
    """The default model's greedy reply repeats a <script> and an <img onerror>: both show as text, no such
    element appears in the conversation, and nothing ran."""
    page = ChatPage(driver, real_server).open()
    page.settings(temperature=0, max_tokens=40)
    page.send(XSS_PROMPT)
    page.wait_idle(timeout=120)
    reply = page.find(".message.assistant .content").text
    assert "<script>window.__pwned=1</script>" in reply
    assert '<img src=x onerror="window.__pwned=2">' in reply
    assert XSS_PROMPT in page.find(".message.user .content").text
    assert page.find_all("#messages script, #messages img, #messages iframe, #messages svg") == []
    time.sleep(0.5)
    assert page.js("return window.__pwned") is None
    assert not page.find_all(".error")


@pytest.mark.slow
def test_screenshot_of_a_real_conversation(driver, real_server, tmp_path):
    """A real conversation at laptop size, saved as a PNG (LLAISYS_WEBUI_SCREENSHOT picks where)."""
    page = ChatPage(driver, real_server).open()
    page.settings(temperature=0, max_tokens=160)
    page.send("Who are you? Answer in one sentence.")
    page.wait_idle(timeout=120)
    page.send("Write a Python function that checks whether a number is prime, with a one-line explanation.")
    page.wait_idle(timeout=120)
    assert page.find_all(".message.assistant .code-block")
    assert not page.find_all(".error")
    driver.execute_script("document.activeElement.blur()")
    out = Path(os.environ.get("LLAISYS_WEBUI_SCREENSHOT") or tmp_path / "chat-page.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(out))
    assert out.stat().st_size > 10_000
