"""The playground page at ``/`` in a real headless Chromium against a real ``eqm serve`` (API key on).

Each test opens a fresh page (fresh session storage, so it enters the key), drives it like a person
would and checks what the page shows against what the API says. Every request the page makes to
anything but loopback is refused and recorded; the tests assert there were none.

``PLAYGROUND_SCREENSHOTS=docs/playground python -m pytest tests/test_playground.py`` also saves the
screenshots the README shows.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from browser import chromium_page
from models import resolve_checkpoint
from models.eqm.checkpoint import ModelSpec, save_safetensors
from models.eqm.network import EqM, EqMConfig
from service.embedded_redis import free_port

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "playground-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
START_TIMEOUT_S = 120
JOB_TIMEOUT_MS = 60_000
SHOTS = os.environ.get("PLAYGROUND_SCREENSHOTS")

pytestmark = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(),
                                reason="the bundled digits model (models/weights/digits.safetensors) is missing")


class Server:
    def __init__(self, base: str, redis_url: str):
        self.base, self.redis_url = base, redis_url

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.base}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()

    def events(self, job_id: str) -> list[tuple[str, dict]]:
        text = httpx.get(f"{self.base}/v1/jobs/{job_id}/events", headers=AUTH, timeout=30).text
        out = []
        for block in text.strip().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
            out.append((fields["event"], json.loads(fields["data"])))
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("playground"), EQM_CHECKPOINT="digits")


@pytest.fixture(scope="module")
def imagenet_like_server(tmp_path_factory):
    """A 1000-class RGB model (tiny, untrained: only its shape matters here) behind a real ``eqm serve``."""
    folder = tmp_path_factory.mktemp("imagenet-like")
    config = EqMConfig(arch="custom", input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=1,
                       num_heads=2, num_classes=1000)
    save_safetensors(EqM(config), ModelSpec(config, "all", "identity"), folder / "tiny-1000.safetensors")
    yield from serve(folder, EQM_CHECKPOINT=str(folder / "tiny-1000.safetensors"), EQM_CAPACITY="8")


def serve(folder: Path, **settings: str):
    log = folder / "serve.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    env.update(PYTHONPATH=str(ROOT), EQM_API_KEYS=API_KEY, EQM_HEARTBEAT_S="0.5", **settings)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--device", "cpu",
                                 "--threads", "1"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"eqm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                pytest.fail(f"eqm serve not ready in {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        redis_url = re.search(r"embedded Redis on (redis://\S+)", log.read_text()).group(1)
        yield Server(base, redis_url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def open_playground(b, server: Server) -> None:
    """Load the page and give it the key it asks for."""
    page = b.page
    page.goto(server.base + "/")
    page.get_by_role("textbox", name="API key").fill(API_KEY)
    page.get_by_role("button", name="Use this key").click()
    page.wait_for_selector("#app:not([hidden])")


def fix_seed(page, task: str, seed: int) -> None:
    """Untick "random" (the page's default) and type a seed: the images are then reproducible."""
    page.uncheck(f"#{task}-seed-random")
    page.fill(f"#{task}-seed", str(seed))


def shot(b, name: str, full_page: bool = False) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        b.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=full_page)


def finished_job_id(page) -> str:
    """The id of the page's job, once an image of it can be downloaded from the page."""
    href = page.get_attribute(".card .download:not([hidden])", "href", timeout=JOB_TIMEOUT_MS)
    assert href.startswith("blob:")
    return page.evaluate("state.job.id")


def curl_json(page) -> dict:
    """The JSON body of the page's "copy as curl" command, as a shell would pass it."""
    text = page.input_value("#curl-text")
    body = re.search(r"-d '(.*)'$", text, re.S).group(1).replace("'\\''", "'")
    return json.loads(body)


# Chromium logs every 4xx answer; the page asks without a key first (401) and shows refusals (422).
EXPECTED_REFUSAL = re.compile(r"^Failed to load resource: the server responded with a status of (401|415|422) ")


def clean(b) -> None:
    assert b.blocked == [], f"the page reached outside the server: {b.blocked}"
    errors = [e for e in b.console_errors if not EXPECTED_REFUSAL.match(e)]
    assert b.page_errors == [] and errors == [], (b.page_errors, errors)


def test_page_and_assets_are_served_without_a_key_and_name_no_other_host(server):
    page = httpx.get(server.base + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:href|src)="(playground/[^"]+)"', page.text)
    assert sorted(assets) == ["playground/app.js", "playground/style.css"]
    for path in assets:
        resp = httpx.get(f"{server.base}/{path}", timeout=10)      # no key needed: the page asks for it
        assert resp.status_code == 200, path
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", resp.text), f"{path} names another host"
    assert httpx.get(server.base + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.base + "/playground/missing.js", timeout=10).status_code == 404


def test_asks_for_the_key_once_and_loads_nothing_from_outside(server):
    with chromium_page() as b:
        page = b.page
        page.goto(server.base + "/")
        page.wait_for_selector("#key-panel:not([hidden])")
        page.get_by_role("textbox", name="API key").fill("wrong-key")
        page.get_by_role("button", name="Use this key").click()
        page.wait_for_selector("#key-error:has-text('refused')")
        page.get_by_role("textbox", name="API key").fill(API_KEY)
        page.get_by_role("button", name="Use this key").click()
        page.wait_for_selector("#app:not([hidden])")
        assert "digits" in page.inner_text("#model-info") and "8×8" in page.inner_text("#model-info")
        assert page.evaluate("sessionStorage.getItem('eqm-api-key')") == API_KEY
        page.reload()                                    # same tab: the key is remembered
        page.wait_for_selector("#app:not([hidden])")
        assert page.is_hidden("#key-panel")
        assert page.locator("#class-list option").count() == 10
        # Every control has a name a screen reader can say.
        unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => !el.closest('template') && !(el.labels && el.labels.length) &&
                    !el.getAttribute('aria-label') && !(el.textContent || '').trim())
            .map(el => el.outerHTML)""")
        assert unnamed == []
        clean(b)


def test_generate_four_digits_with_their_descent(server):
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        page.fill("#generate-label", "4")
        page.fill("#generate-n", "4")
        fix_seed(page, "generate", 10)
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector("#job-status[data-status=done]", timeout=JOB_TIMEOUT_MS)
        page.wait_for_function("document.querySelectorAll('.card .frame img').length === 4", timeout=JOB_TIMEOUT_MS)
        job = server.job(finished_job_id(page))
        assert job["status"] == "done" and [i["seed"] for i in job["images"]] == [10, 11, 12, 13]
        assert curl_json(page) == {"labels": [4], "n": 4, "seed": 10, "format": "png"}
        cards = page.locator(".card")
        assert cards.count() == 4
        evaluations = {k: sum(len(d["norms"]) for name, d in server.events(job["id"])
                              if name in ("progress", "image") for d in ([d] if name == "image" else d["images"])
                              if d["index"] == k) for k in range(4)}
        for k, image in enumerate(job["images"]):
            card = cards.nth(k)
            assert card.locator(".steps").inner_text() == f"{image['steps']} steps"
            assert card.get_attribute("data-state") == ("converged" if image["stopped_early"] else "step_cap")
            assert f"seed {image['seed']}" in card.inner_text()
            # The events hold one norm per evaluation (an early stop evaluates once more without an update)
            # and the page plots every one of them.
            assert evaluations[k] == image["steps"] + int(image["stopped_early"])
            assert f"over {evaluations[k]} evaluations" in card.locator("canvas.plot").get_attribute("aria-label")
            size = card.locator("img").evaluate("img => [img.naturalWidth, img.clientWidth]")
            assert size[0] == 8 and size[1] >= 128             # shown large, from the 8x8 original
        shot(b, "generate")
        clean(b)


def shown_cards(page) -> int:
    return page.locator("#images .card").count()


def test_compose_one_and_seven(server):
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        page.fill("#generate-n", "1")                    # a Generate job first: Compose must not show it
        page.fill("#generate-max_steps", "3")
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector("#job-status[data-status=done]", timeout=JOB_TIMEOUT_MS)
        generate_id = finished_job_id(page)
        page.focus("#tab-generate")
        page.keyboard.press("ArrowRight")                # tabs work from the keyboard
        assert page.evaluate("document.activeElement.id") == "tab-compose" and page.is_visible("#panel-compose")
        assert shown_cards(page) == 0 and page.is_hidden("#job-bar") and page.is_hidden("#curl-box")
        assert page.is_visible("#empty")
        assert page.input_value("#compose-rows li:nth-child(1) input[name=labels]") == "1"
        assert page.input_value("#compose-rows li:nth-child(2) input[name=labels]") == "7"
        fix_seed(page, "compose", 3)
        page.click("#panel-compose button[type=submit]")
        page.wait_for_selector("#job-status[data-status=done]", timeout=JOB_TIMEOUT_MS)
        page.wait_for_function("document.querySelectorAll('.card .frame img').length === 2", timeout=JOB_TIMEOUT_MS)
        job = server.job(finished_job_id(page))
        assert job["kind"] == "compose"
        assert [(i["labels"], i["weights"]) for i in job["images"]] == [([1, 7], [0.5, 0.5])] * 2
        assert page.locator(".card .title").all_inner_texts() == ["class 1 + class 7"] * 2
        assert curl_json(page)["labels"] == [1, 7]
        page.evaluate("window.scrollTo(0, 0)")
        shot(b, "compose")
        # Each tab keeps its own job: back on Generate, its image, status and request; then Compose's again.
        page.click("#tab-generate")
        assert shown_cards(page) == 1 and page.evaluate("state.job.id") == generate_id
        assert page.inner_text("#job-status").startswith(f"Job {generate_id[:8]}: done")
        assert page.locator("#images .card .frame img").count() == 1
        assert curl_json(page) == {"labels": [3], "n": 1, "max_steps": 3, "format": "png"}   # random seed: none sent
        page.click("#tab-compose")
        assert shown_cards(page) == 2 and page.evaluate("state.job.id") == job["id"]
        assert page.locator(".card .title").all_inner_texts() == ["class 1 + class 7"] * 2
        assert curl_json(page)["labels"] == [1, 7]
        page.click("#tab-denoise")                       # a tab with no job yet: nothing of the others
        assert shown_cards(page) == 0 and page.is_hidden("#job-bar") and page.is_hidden("#curl-box")
        clean(b)


def in_viewport(page, selector: str) -> bool:
    box = page.locator(selector).bounding_box()
    size = page.viewport_size
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= size["height"] and \
        box["x"] >= 0 and box["x"] + box["width"] <= size["width"]


def test_draw_a_stroke_and_denoise_it(server):
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        page.click("#tab-denoise")
        box = page.locator("#draw-canvas").bounding_box()
        x, top, bottom = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.15, box["y"] + box["height"] * 0.85
        page.mouse.move(x, top)
        page.mouse.down()
        for t in range(1, 11):                           # a vertical stroke: a "1"
            page.mouse.move(x, top + (bottom - top) * t / 10)
        page.mouse.up()
        drawn = page.evaluate("""() => { const d = document.getElementById('preview-input').getContext('2d')
            .getImageData(0, 0, 8, 8).data; let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i]; return s; }""")
        assert drawn > 0, "the stroke did not reach the 8x8 model input"
        page.fill("#denoise-label", "1")
        fix_seed(page, "denoise", 5)
        page.click("#panel-denoise button[type=submit]")
        page.wait_for_selector("#job-status[data-status=done]", timeout=JOB_TIMEOUT_MS)
        page.wait_for_selector(".card .frame img", timeout=JOB_TIMEOUT_MS)
        job = server.job(finished_job_id(page))
        assert job["kind"] == "denoise" and job["noise_level"] == 0.6 and job["images"][0]["labels"] == [1]
        # What the server stored as the start: the drawing at the model's size, a bright vertical stroke.
        stored = redis.Redis.from_url(server.redis_url).get(f"eqm:job:{job['id']}:input")
        pixels = Image.open(io.BytesIO(stored)).convert("L")
        assert pixels.size == (8, 8)
        columns = [sum(pixels.getpixel((cx, cy)) for cy in range(8)) for cx in range(8)]
        assert max(columns[3:5]) > 4 * max(columns[0], columns[7], 1)
        text = page.input_value("#curl-text")
        assert "-F 'image=@drawing.png'" in text and "-F 'noise_level=0.6'" in text and "-F 'label=1'" in text
        assert page.get_attribute("#curl-upload", "download") == "drawing.png"
        # At 1280x800 the Denoise button is below the results' top: the page brings the results into view.
        assert page.viewport_size == {"width": 1280, "height": 800}
        assert in_viewport(page, "#job-status") and in_viewport(page, ".card .frame img")
        page.click("#curl-box summary")
        shot(b, "denoise")
        clean(b)


def test_cancel_a_long_job(server):
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        page.fill("#generate-n", "8")
        page.fill("#generate-max_steps", "1000")
        page.fill("#generate-grad_norm_threshold", "0")
        page.click("#panel-generate button[type=submit]")
        # Live step counts, "k / 1000 steps", before anything is finished.
        page.wait_for_function("[...document.querySelectorAll('.card .steps')].some(e => /^[1-9]\\d* \\/ 1000 steps$/"
                               ".test(e.textContent))", timeout=JOB_TIMEOUT_MS)
        if SHOTS:                                        # a descent well under way
            page.wait_for_function("[...document.querySelectorAll('.card .steps')].some(e => parseInt(e.textContent) >= 60)",
                                   timeout=JOB_TIMEOUT_MS)
            shot(b, "running")
        page.click("#cancel")
        page.wait_for_selector("#job-status[data-status=cancelled]", timeout=JOB_TIMEOUT_MS)
        job = server.job(page.evaluate("state.job.id"))
        assert job["status"] == "cancelled" and job["cancel_requested"]
        unfinished = [i["index"] for i in job["images"] if not i["ready"]]
        assert unfinished
        for k in unfinished:
            card = page.locator(f".card[data-index='{k}']")
            assert card.get_attribute("data-state") == "cancelled" and "cancelled" in card.inner_text()
            assert card.locator(".frame").inner_text() == "cancelled" and "descending" not in card.inner_text()
        clean(b)


def test_cancel_keeps_the_finished_images(server):
    """Seeds 0-7 at threshold 0.03: the images stop between ~170 steps and the cap of 1000, so
    cancelling once the first is finished leaves finished and unfinished ones. With previews every running
    image shows its iterate long before that: only a finished card's image counts."""
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        page.fill("#generate-n", "8")
        fix_seed(page, "generate", 0)
        page.fill("#generate-max_steps", "1000")
        page.fill("#generate-grad_norm_threshold", "0.03")
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector(".card[data-state=running] .frame img.preview", timeout=JOB_TIMEOUT_MS)
        # A preview is marked as one, on a running card; it is never taken for a finished image.
        assert page.locator(".card .frame img:not(.preview)").count() == 0
        page.wait_for_selector(".card[data-state=converged] .frame img:not(.preview)", timeout=JOB_TIMEOUT_MS)
        page.click("#cancel")
        page.wait_for_selector("#job-status[data-status=cancelled]", timeout=JOB_TIMEOUT_MS)
        job = server.job(page.evaluate("state.job.id"))
        assert job["status"] == "cancelled"
        ready = [i["index"] for i in job["images"] if i["ready"]]
        assert ready and len(ready) < 8, ready
        page.wait_for_function(f"document.querySelectorAll('.card .frame img:not(.preview)').length === {len(ready)}",
                               timeout=JOB_TIMEOUT_MS)
        for image in job["images"]:
            card = page.locator(f".card[data-index='{image['index']}']")
            if image["ready"]:
                assert card.locator(".frame img").count() == 1 and card.get_attribute("data-state") == "converged"
                assert card.locator(".frame img.preview").count() == 0
                assert card.locator(".steps").inner_text() == f"{image['steps']} steps"
            else:
                # The last preview stays (how far the descent got), marked cancelled, with nothing to download.
                assert card.get_attribute("data-state") == "cancelled"
                assert card.locator(".frame img.preview").count() == 1
                assert card.locator(".frame img.preview").get_attribute("src").startswith("data:image/png;base64,")
                assert card.locator(".frame .frame-note").inner_text() == "cancelled"
                assert card.locator(".download").is_hidden()
            assert "descending" not in card.inner_text()
        clean(b)


def test_seed_is_random_by_default_so_each_click_makes_new_images(server):
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        for task in ("generate", "compose", "denoise", "inpaint"):
            page.click(f"#tab-{task}")
            assert page.is_checked(f"#{task}-seed-random") and page.is_disabled(f"#{task}-seed"), task
        page.click("#tab-generate")
        page.fill("#generate-n", "2")
        page.fill("#generate-max_steps", "2")
        seeds = []
        for _ in range(2):
            before = page.evaluate("state.job && state.job.id")
            page.click("#panel-generate button[type=submit]")
            page.wait_for_function(f"state.job && state.job.id !== {json.dumps(before)} && state.job.final",
                                   timeout=JOB_TIMEOUT_MS)
            seeds.append([i["seed"] for i in server.job(page.evaluate("state.job.id"))["images"]])
            assert "seed" not in curl_json(page)
        assert seeds[0] != seeds[1], seeds
        clean(b)


def test_every_submit_button_is_in_view_at_1280x800(server):
    """A task runs without scrolling to find its button, however long its form (Denoise, Inpaint)."""
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        assert page.viewport_size == {"width": 1280, "height": 800}
        for task in ("generate", "compose", "denoise", "inpaint"):
            page.click(f"#tab-{task}")
            page.evaluate("window.scrollTo(0, 0)")
            assert in_viewport(page, f"#panel-{task} button[type=submit]"), task
        clean(b)


def test_previews_show_the_images_forming(server):
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        page.fill("#generate-n", "4")
        page.fill("#generate-max_steps", "1000")
        page.fill("#generate-grad_norm_threshold", "0")
        page.fill("#generate-step_size", "0.002")
        page.click("#panel-generate button[type=submit]")
        # While the job runs, the frames show the iterate (a PNG from the progress events), not a black box.
        page.wait_for_selector(".card[data-state=running] .frame img.preview", timeout=JOB_TIMEOUT_MS)
        first = page.get_attribute(".card .frame img.preview", "src")
        assert first.startswith("data:image/png;base64,")
        assert server.job(page.evaluate("state.job.id"))["status"] == "running"
        page.wait_for_function(f"document.querySelector('.card .frame img.preview').src !== {json.dumps(first)}",
                               timeout=JOB_TIMEOUT_MS)               # and it changes as the image forms
        shot(b, "previews")
        page.click("#cancel")
        page.wait_for_selector("#job-status[data-status=cancelled]", timeout=JOB_TIMEOUT_MS)
        clean(b)


def _png_pixels(server: Server, job_id: str, k: int):
    import numpy as np
    resp = httpx.get(f"{server.base}/v1/jobs/{job_id}/images/{k}", headers={"Authorization": f"Bearer {API_KEY}"})
    return np.array(Image.open(io.BytesIO(resp.content)))


def test_inpaint_the_lower_half_of_a_generated_digit(server):
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        page.fill("#generate-label", "7")
        page.fill("#generate-n", "1")
        fix_seed(page, "generate", 3)
        page.click("#panel-generate button[type=submit]")
        first = finished_job_id(page)
        page.click("#tab-inpaint")
        page.click("#mask-use-result")                  # the Generate tab's image, though not shown here
        assert page.inner_text("#panel-inpaint .form-error") == ""
        page.click("#mask-lower")
        page.fill("#inpaint-label", "7")
        fix_seed(page, "inpaint", 5)
        page.click("#panel-inpaint button[type=submit]")
        page.wait_for_function(f"state.job && state.job.id !== {json.dumps(first)} && state.job.final",
                               timeout=JOB_TIMEOUT_MS)
        page.wait_for_function("document.querySelectorAll('.card .frame img:not(.preview)').length === 2",
                               timeout=JOB_TIMEOUT_MS)
        job = server.job(page.evaluate("state.job.id"))
        assert job["status"] == "done" and job["kind"] == "inpaint"
        source = _png_pixels(server, first, 0)
        for k in range(2):
            out = _png_pixels(server, job["id"], k)
            assert (out[:4] == source[:4]).all()            # the upper half, held exactly
        assert "inpainted" in page.locator(".card .title").first.inner_text()
        shot(b, "inpaint")
        clean(b)


def test_a_bad_value_shows_the_servers_error_beside_its_field(server):
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        page.fill("#generate-label", "12")
        page.fill("#generate-max_steps", "5000")
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector("#generate-max_steps-error:not(:empty)")
        assert page.inner_text("#generate-max_steps-error") == "Input should be less than or equal to 1000"
        assert page.get_attribute("#generate-max_steps", "aria-invalid") == "true"
        page.fill("#generate-max_steps", "")
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector("#generate-labels-error:not(:empty)")
        # the server's one line, word for word, beside the class field; no job was made
        resp = httpx.post(f"{server.base}/v1/generations", headers=AUTH, json={"labels": [12]})
        assert page.inner_text("#generate-labels-error") == resp.json()["detail"][0]["msg"]
        assert page.is_hidden("#job-bar")
        # A picked file goes to the server as it is; the server's verdict shows beside the image.
        page.click("#tab-denoise")
        page.set_input_files("#denoise-file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                      "buffer": b"not an image"}])
        page.click("#panel-denoise button[type=submit]")
        page.wait_for_selector("#denoise-image-error:has-text('PNG')")
        assert "-F 'image=@notes.txt'" in page.input_value("#curl-text")
        assert page.is_hidden("#job-bar")
        clean(b)


def test_the_page_follows_the_served_model(imagenet_like_server):
    server = imagenet_like_server
    with chromium_page() as b:
        page = b.page
        open_playground(b, server)
        assert "16×16 RGB" in page.inner_text("#model-info") and "1000 classes" in page.inner_text("#model-info")
        assert page.locator("#class-list option").count() == 1000
        assert page.locator("#class-list option[value='207: golden retriever']").count() == 1
        page.fill("#generate-label", "golden retriever")          # a name: the server resolves it
        page.fill("#generate-n", "2")
        page.fill("#generate-max_steps", "3")
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector("#job-status[data-status=done]", timeout=JOB_TIMEOUT_MS)
        page.wait_for_function("document.querySelectorAll('.card .frame img').length === 2", timeout=JOB_TIMEOUT_MS)
        job = server.job(finished_job_id(page))
        assert [i["labels"] for i in job["images"]] == [[207], [207]]
        assert page.locator(".card .title").all_inner_texts() == ["golden retriever"] * 2
        assert page.locator(".card img").first.evaluate("img => img.naturalWidth") == 16
        page.click("#tab-denoise")
        assert page.get_attribute("#preview-input", "width") == "16" and "16×16" in page.inner_text("#panel-denoise")
        clean(b)


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_readable_at_desktop_and_phone_widths(server, width, height):
    with chromium_page(viewport=(width, height)) as b:
        page = b.page
        open_playground(b, server)
        page.fill("#generate-n", "6")
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector("#job-status[data-status=done]", timeout=JOB_TIMEOUT_MS)
        page.wait_for_function("document.querySelectorAll('.card .frame img').length === 6", timeout=JOB_TIMEOUT_MS)
        # Nothing is wider than the screen, on any tab: no sideways scrolling.
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        for tab in ("compose", "denoise", "inpaint", "generate"):
            page.click(f"#tab-{tab}")
            assert page.evaluate("document.documentElement.scrollWidth") <= width, tab
        if width < 500:
            page.evaluate("window.scrollTo(0, 0)")
            shot(b, "phone")
            page.locator("#job-bar").scroll_into_view_if_needed()
            shot(b, "phone-results")
        clean(b)


def test_redoc_loads_nothing_from_outside_the_server(server):
    """The ReDoc page (its script, the schema, its side menu's footer) asks this server only."""
    with chromium_page() as b:
        page = b.page
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(server.base + "/redoc")
        page.locator("h2", has_text="Generate images of classes").first.wait_for(timeout=30_000)
        page.get_by_text("API docs by Redocly").wait_for(timeout=30_000)          # the footer is drawn
        page.wait_for_load_state("networkidle")
        outside = [url for url in requests if not url.startswith(server.base + "/") and not url.startswith("data:")]
        assert outside == [] and b.blocked == [], (outside, b.blocked)
        assert any(url.endswith("/redoc.standalone.js") for url in requests)
        sources = page.evaluate("[...document.images].map(img => img.src)")
        assert [src for src in sources if not src.startswith((server.base + "/", "data:"))] == []
        assert b.console_errors == [] and b.page_errors == [], (b.console_errors, b.page_errors)


def test_redoc_script_keeps_no_url_of_the_cdn():
    from service.api.redoc_script import local_script
    logo = 'r.createElement("img",{alt:"redocly logo",onError:()=>t(!1),src:"https://cdn.redoc.ly/redoc/logo-mini.svg"})'
    assert local_script(f"return e?{logo}:null") == "return e?null:null"
    # Another shape of a later release: no request is still made.
    assert local_script('a={src:"https://cdn.redoc.ly/x/y.png"}') == 'a={src:""}'
