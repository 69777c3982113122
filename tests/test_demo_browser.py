"""The browser demo (``python -m uvjax.demo``) end to end in a real headless Chromium driven by Selenium.

A tiny trained run (4 steps) with a randomly initialised VQ tokenizer is served by the demo; in the browser we
upload a PNG and ask about it, and draw two images. What the page shows must equal what the Python API
(``uvjax.api.load(run)``) returns for the same inputs, called directly: the answer text character for character,
and the images pixel for pixel (downloaded from the page as PNGs). Neither the server nor the page may reach any
host but the local server (Gradio analytics, version checks, fonts). Needs Debian's ``chromium`` and
``chromium-driver`` and gradio; skipped with the reason when one is missing.
"""
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request

import numpy as np
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
for _path, _pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
    if not os.path.exists(_path):
        pytest.skip(f"{_path} is missing: apt-get install -y chromium chromium-driver (package {_pkg})",
                    allow_module_level=True)
pytest.importorskip("gradio", reason="gradio is not installed: pip install -e '.[demo]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[test]'")
os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a driver or a browser

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}
_remote_attempts: list = []  # (event, host) of network calls to other hosts while the server runs
_watching = [False]


def _audit(event, args):
    """Every DNS lookup / connect of this process while the demo runs (Gradio phoning home would show here)."""
    if not _watching[0]:
        return
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect":
        host = args[1][0] if isinstance(args[1], tuple) else None  # (host, port, ...); AF_UNIX paths are local
    else:
        return
    host = host.decode() if isinstance(host, bytes) else host
    if host is not None and host not in LOCAL_HOSTS:
        _remote_attempts.append((event, host))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 4-step vqvq smoke run on code records, plus a random (untrained) VQ tokenizer at ``<run>/vq``: images in
    and out go through a real VQ encoder/decoder; the answers are nonsense, which does not matter here."""
    import jax
    from configs.vqvq import get_config
    from datasets import make_code_dataset
    from uvjax.config import load_config_file
    from uvjax.train import run
    from uvjax.training.vq_train import init_params, vq_config_from
    from uvjax.weights.llamagen_vq import save_vq
    root = tmp_path_factory.mktemp("demo")
    ds = make_code_dataset(str(root / "data"), num_images=24, image_tokens=16, num_codes=64)
    cfg = get_config("smoke")  # 32 px images (stages.data.image_size), 64 codes
    with cfg.unlocked():
        cfg.stages.build = False
        cfg.data.tokenizer = ds["tokenizer"]
        cfg.data.streams.understanding.paths = (ds["paths"]["understanding"],)
        cfg.data.streams.generation.paths = (ds["paths"]["generation"],)
        cfg.train.steps, cfg.train.progress, cfg.train.async_checkpoint = 4, False, False
    run(cfg, str(root / "run"))
    vq = load_config_file("vq_tokenizer", "smoke")
    vq.model.ch_mult = (1, 2, 2, 2)  # downsample 8: 32 px -> 4x4 = 16 codes, as the run was trained on
    vcfg = vq_config_from(vq)
    os.makedirs(root / "run" / "vq")
    save_vq(init_params(vcfg, jax.random.PRNGKey(0), 32), vcfg, str(root / "run" / "vq" / "vq.safetensors"))
    return str(root / "run")


@pytest.fixture(scope="module")
def served(run_dir):
    """The demo as ``uvjax-demo --workdir=RUN --port=0`` serves it (its flags, its ``serve``), in a server thread
    of this process, so the test can call the very model the page uses through the API."""
    import uvjax.train  # noqa: F401  (owns absl's global --workdir; the demo's flag set must not clash with it)
    from uvjax import demo
    rest = demo.FLAGS(["uvjax-demo", f"--workdir={run_dir}", "--port=0"], known_only=True)
    assert rest == ["uvjax-demo"] and demo.FLAGS.host == "127.0.0.1" and not demo.FLAGS.share
    _watching[0] = True
    run, app, url = demo.serve(demo.FLAGS.workdir, step=demo.FLAGS.step, host=demo.FLAGS.host,
                               port=demo.FLAGS.port, share=demo.FLAGS.share, block=False)
    yield run, url
    app.close()
    _watching[0] = False


@pytest.fixture(scope="module")
def model(served):
    m = served[0]
    assert m.image_size == 32 and m.can_generate
    return m


@pytest.fixture(scope="module")
def server(served):
    return served[1]


@pytest.fixture(scope="module")
def browser(server):
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1280,1600"):
        opts.add_argument(a)
    profile = tempfile.TemporaryDirectory(prefix="uvjax-chromium-")
    opts.add_argument(f"--user-data-dir={profile.name}")
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
    driver.get(server)
    yield driver
    driver.quit()
    profile.cleanup()


def _css(driver, sel):
    return driver.find_element(By.CSS_SELECTOR, sel)


def _wait(driver, cond, what, timeout=60):
    return WebDriverWait(driver, timeout).until(lambda d: cond(), message=f"timed out waiting for {what}")


def _set_number(driver, elem_id, value):
    """Types into a slider's / number box's number field and leaves it (the change event fires on blur)."""
    box = _css(driver, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _open_tab(driver, label, probe):
    tab = lambda: [t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == label]
    _wait(driver, tab, f"the {label!r} tab button")
    tab()[0].click()
    _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, probe), f"tab {label!r}")


def _spy(monkeypatch, model, name):
    """Records the arguments the page's request reaches the API with (the call still goes through): a 4-step
    model's sampled text barely depends on the image or the CFG scale, so equal outputs alone would not show
    that the page passed them on."""
    calls, real = [], getattr(model, name)

    def spy(*args, **kw):
        calls.append((args, kw))
        return real(*args, **kw)
    monkeypatch.setattr(model, name, spy)
    return calls


def _shown(text):
    """What a browser keeps of a text in a text field or the DOM: HTML parsing turns CR LF and CR into LF and
    drops NUL (the byte-level BPE of a barely trained model writes such bytes)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def _page_error(driver):
    """The text of a Gradio error toast, if one is shown (so a failure says why instead of timing out)."""
    toasts = driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
    return " | ".join(t.text for t in toasts)


def test_ask_about_an_uploaded_image_shows_the_api_answer(browser, model, tmp_path, monkeypatch):
    # RGBA and not square: the API's own conversion (alpha over white, centre crop) must be what the page uses
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    png = str(tmp_path / "question.png")
    from PIL import Image
    Image.fromarray(rgba, "RGBA").save(png)
    question = "What is the weather?"
    # sampled (greedy says nothing after 4 steps): the first seed whose answer is not empty, so equality has teeth
    seed = next(s for s in range(20) if model.answer(png, question, temperature=1.0, seed=s, max_new_tokens=24))
    want = model.answer(png, question, temperature=1.0, seed=seed, max_new_tokens=24)
    calls = _spy(monkeypatch, model, "answer")

    d = browser
    _wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#ask_image input[type=file]"), "the upload field")
    _css(d, "#ask_image input[type=file]").send_keys(png)
    _wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#ask_image img"), "the uploaded image preview")
    _css(d, "#ask_question textarea").send_keys(question)
    _css(d, "#ask_decoding button").click()
    _wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#ask_temperature input[type=number]"), "decoding controls")
    for elem_id, v in (("ask_temperature", 1), ("ask_seed", seed), ("ask_tokens", 24)):
        _set_number(d, elem_id, v)
    _css(d, "#ask_submit").click()
    _wait(d, lambda: _css(d, "#ask_answer textarea").get_attribute("value") or _page_error(d), "the answer")
    assert not _page_error(d)
    assert _css(d, "#ask_answer textarea").get_attribute("value") == _shown(want)
    # the uploaded file reached the API untouched (RGBA, every pixel): the API, not gradio, converts it
    [((image, q), kw)] = calls
    assert q == question and kw == dict(max_new_tokens=24, temperature=1.0, seed=seed)
    assert image.mode == "RGBA" and np.array_equal(np.asarray(image), rgba)


def test_draw_two_images_shows_the_api_images_as_pngs(browser, model, server, monkeypatch):
    prompt, seed, cfg_scale = "a watch face showing rain", 5, 1.5
    want = model.generate(prompt, n=2, seed=seed, cfg_scale=cfg_scale)
    assert len(want) == 2 and not np.array_equal(np.asarray(want[0]), np.asarray(want[1]))  # order matters
    calls = _spy(monkeypatch, model, "generate")

    d = browser
    _open_tab(d, "Draw", "#draw_prompt textarea")
    _css(d, "#draw_prompt textarea").send_keys(prompt)
    for elem_id, v in (("draw_n", 2), ("draw_seed", seed), ("draw_cfg", cfg_scale)):
        _set_number(d, elem_id, v)
    _css(d, "#draw_submit").click()
    imgs = lambda: d.find_elements(By.CSS_SELECTOR, "#draw_gallery img")
    _wait(d, lambda: len(imgs()) >= 2 or _page_error(d), "two images")
    assert not _page_error(d)
    assert calls == [((prompt,), dict(n=2, cfg_scale=cfg_scale, temperature=1.0, seed=seed))]
    srcs = [i.get_attribute("src") for i in imgs()]
    assert len(srcs) == 2, srcs
    from PIL import Image
    for i, src in enumerate(srcs):
        assert src.startswith(server), src  # served by the demo itself
        with urllib.request.urlopen(src, timeout=30) as r:
            data = r.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"image {i} is not a PNG: {data[:16]!r}"
        got = Image.open(io.BytesIO(data))
        assert got.format == "PNG" and got.size == (model.image_size, model.image_size)
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(want[i]), err_msg=f"image {i}")


def test_chat_shows_the_api_parts_in_order(browser, model, monkeypatch):
    """The interleaved answer's parts in order, each text verbatim (no markdown / HTML), an image where the API
    put one."""
    prompt = "Draw a watch with a cloud icon, then describe <b>it</b> *now*."
    kw = dict(max_new_tokens=16, max_images=1, temperature=1.0, image_temperature=1.0)
    seed = next(s for s in range(20) if model.chat(prompt, **kw, seed=s))  # a non-empty answer
    want = model.chat(prompt, **kw, seed=seed)
    calls = _spy(monkeypatch, model, "chat")
    d = browser
    _open_tab(d, "Chat", "#chat_prompt textarea")
    _css(d, "#chat_decoding button").click()
    _wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#chat_temperature input[type=number]"), "decoding controls")
    for elem_id, v in (("chat_tokens", 16), ("chat_max_images", 1), ("chat_temperature", 1), ("chat_seed", seed)):
        _set_number(d, elem_id, v)
    _css(d, "#chat_prompt textarea").send_keys(prompt)
    _css(d, "#chat_submit").click()
    bot = lambda: d.find_elements(By.CSS_SELECTOR, "#chat_box [data-testid=bot]")
    _wait(d, lambda: bot() or _page_error(d), "the answer")
    assert not _page_error(d)
    assert calls == [((prompt, None), dict(kw, cfg_scale=0.0, seed=seed))]
    js = "Array.from(document.querySelectorAll('#chat_box [data-testid=%s]')).map(m => m.querySelector('img') ? " \
         "'<image>' : m.textContent)"
    assert d.execute_script(f"return {js % 'user'}") == [_shown(prompt)]
    assert d.execute_script(f"return {js % 'bot'}") == [_shown(p) if isinstance(p, str) else "<image>" for p in want]
    # bad input: the API's error reaches the page as a message (here: a special token typed into the prompt)
    _css(d, "#chat_prompt textarea").send_keys("hello </s>")
    _css(d, "#chat_submit").click()
    _wait(d, lambda: _page_error(d), "an error message")
    assert "special-token string '</s>'" in _page_error(d)


def test_nothing_but_the_local_server_was_contacted(browser, server):
    """After the other tests: the page loaded nothing from elsewhere, and the server process looked up no host."""
    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    assert any(u.startswith(server) for u in urls)
    # over the network (chrome:// pages of the browser's own first tab are not); local addresses only
    foreign = [u for u in urls if re.match(r"(https?|wss?|ftp)://", u)
               and not re.match(r"(https?|wss?)://(127\.0\.0\.1|localhost|\[::1\])[:/]", u)]
    assert not foreign, foreign
    assert not _remote_attempts, _remote_attempts


def test_command_line_flags():
    """``python -m uvjax.demo``'s own flag parsing: help lists the demo's flags, a missing --workdir is refused."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    help_ = subprocess.run([sys.executable, "-m", "uvjax.demo", "--help"], env=env, capture_output=True, text=True)
    assert help_.returncode == 0, help_.stderr
    for flag in ("--workdir", "--host", "--port", "--[no]share"):
        assert flag in help_.stdout, help_.stdout
    missing = subprocess.run([sys.executable, "-m", "uvjax.demo", "--port=0"], env=env, capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "--workdir" in missing.stderr, missing.stderr
    bad = subprocess.run([sys.executable, "-m", "uvjax.demo", "--workdir=x", "--no_such_flag=1"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "no_such_flag" in bad.stderr, bad.stderr
