"""`pfx serve` (issue 21): the HTTP service on the toy base with the sample concepts, on 127.0.0.1.

The server runs in this process (uvicorn on a thread, the model worker on another) over a real socket; the
clients are plain HTTP (http.client, raw sockets) and, for the web page, headless Chromium through Playwright.
Batching is proved with a forward pre-hook on the UNet that records the batch size of every call.
"""

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="pfx serve needs the serve extra: pip install 'perfusion-hub[serve]'")

from cli.serve import Limits, RenderService, RunningServer, create_app

STEPS = 2
WINDOW_S = 1.5  # long enough that requests sent together from threads always meet in one batch


@pytest.fixture(scope="module")
def served(toy_base, tmp_path_factory):
    """A service over a fresh home with the sample concepts and one concept made for another base."""
    from cli.cmd_serve import RegistrySource
    from cli.engine_store import base_covariance
    from cli.main import Context
    from perfusion_hub.concept import save_concept
    from perfusion_hub.loaders import unload_concepts
    from registry.install import install
    from tests.kit.engine import synthetic_concept

    home = tmp_path_factory.mktemp("serve") / "home"
    ctx = Context(str(home), offline=True, debug=False)
    install(ctx.home, ["cat-mittens", "chair-eames"])
    cov = base_covariance(ctx, toy_base)
    alien = synthetic_concept(toy_base, cov, "dog-other", "dog", seed=3)
    alien.metadata["base_digest"] = "sha256:" + "0" * 64
    alien.metadata["base_name"] = "another-base"
    path = save_concept(alien, home.parent / "dog-other.safetensors")
    ctx.home.add_concept_file(path, covariance={"digest": cov.digest, "size": len(cov.to_bytes()),
                                                "base_digest": "sha256:" + "0" * 64,
                                                "corpus_digest": cov.corpus_digest})
    unload_concepts(toy_base.pipe)
    source = RegistrySource(str(home), True, toy_base, install_missing=False)
    service = RenderService(toy_base, source, Limits(max_count=4, max_steps=10, max_batch=4, window_s=WINDOW_S,
                                                     default_steps=STEPS))
    service.start()
    server = RunningServer(create_app(service))
    yield server, service
    server.stop()
    service.stop()
    unload_concepts(toy_base.pipe)


def request(server, method, path, body=None, *, raw: bytes | None = None, timeout=300):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    res = conn.getresponse()
    out = (res.status, dict(res.getheaders()), res.read())
    conn.close()
    return out


def post(server, body, **kw):
    return request(server, "POST", "/render", body, **kw)


def error_of(resp):
    assert resp[1]["content-type"].startswith("application/json"), resp
    return json.loads(resp[2])["error"]


def concurrently(fns):
    out = [None] * len(fns)

    def go(i, f):
        out[i] = f()

    threads = [threading.Thread(target=go, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return out


class UnetBatches:
    """Records the batch size of every UNet forward (a real forward pre-hook on the served pipeline's UNet)."""

    def __init__(self, unet):
        self.sizes = []
        self.handle = unet.register_forward_pre_hook(lambda m, args: self.sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_health_concepts_and_previews(served):
    server, _ = served
    status, _, body = request(server, "GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["base"] == "toy"
    assert health["limits"]["max_batch"] == 4
    status, _, body = request(server, "GET", "/concepts")
    listing = {c["name"]: c for c in json.loads(body)["concepts"]}
    assert set(listing) == {"cat-mittens", "chair-eames", "dog-other"}
    assert listing["cat-mittens"]["for_this_base"] and not listing["dog-other"]["for_this_base"]
    assert listing["dog-other"]["preview"] is None
    status, headers, png = request(server, "GET", listing["cat-mittens"]["preview"])
    assert status == 200 and headers["content-type"] == "image/png"
    assert Image.open(BytesIO(png)).size[0] > 0
    missing = request(server, "GET", "/concepts/dog-other/preview")
    assert missing[0] == 404 and "no preview" in error_of(missing)
    nowhere = request(server, "GET", "/nope")
    assert nowhere[0] == 404 and "no such page" in error_of(nowhere)


def test_png_response_is_what_pfx_render_writes(served, toy_base):
    server, _ = served
    status, headers, png = post(server, {"prompt": "a photo of cat-mittens on a chair", "seed": 1})
    assert status == 200 and headers["content-type"] == "image/png", png[:300]
    img = Image.open(BytesIO(png))
    meta = json.loads(img.text["pfx"])
    assert meta["seed"] == 1 and meta["steps"] == STEPS and meta["concepts"]["cat-mittens"]["beta"] == 0.7
    assert meta["text"] == "a photo of <cat-mittens> on a chair" and "parameters" in img.text
    from perfusion_hub.render import render

    alone = render(toy_base, "a photo of cat-mittens on a chair", seed=1, steps=STEPS)  # concepts loaded by the server
    assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(alone.images[0]))  # a batch of one: exact


def test_concurrent_requests_with_different_concepts_share_one_unet_batch(served, toy_base):
    server, service = served
    bodies = [{"prompt": "a photo of cat-mittens", "seed": 1, "response": "json"},
              {"prompt": "a photo of chair-eames in a room", "seed": 2, "response": "json"},
              {"prompt": "cat-mittens on chair-eames", "seed": 3, "beta": {"chair-eames": 0.6}, "response": "json"},
              {"prompt": "a photo of a dog on a table", "seed": 4, "response": "json"}]
    before = service.worker.stats["batches"]
    with UnetBatches(toy_base.pipe.unet) as rec:
        answers = concurrently([lambda b=b: post(server, b) for b in bodies])
    assert [a[0] for a in answers] == [200] * 4, [a[2][:200] for a in answers]
    data = [json.loads(a[2]) for a in answers]
    assert rec.sizes == [2 * 4] * STEPS  # one UNet call per step, all four images (x2 for guidance) in it
    assert service.worker.stats["batches"] == before + 1
    assert [d["batch_images"] for d in data] == [4] * 4
    assert [d["concepts"] for d in data] == [["cat-mittens"], ["chair-eames"], ["cat-mittens", "chair-eames"], []]
    assert data[2]["params"]["concepts"]["chair-eames"]["beta"] == 0.6
    images = [Image.open(BytesIO(base64.b64decode(d["images"][0]["png_base64"]))) for d in data]
    assert all(json.loads(im.text["pfx"])["seed"] == b["seed"] for im, b in zip(images, bodies))
    # each image is its own lone render, up to batch-size blocking (perfusion_hub/batch.py)
    from perfusion_hub.render import render

    alone = render(toy_base, "cat-mittens on chair-eames", seed=3, steps=STEPS, beta={"chair-eames": 0.6})
    diff = np.abs(np.asarray(images[2].convert("RGB"), dtype=int) - np.asarray(alone.images[0], dtype=int))
    assert diff.max() <= 1


def test_bad_requests_get_4xx_and_never_hurt_the_batch_or_the_server(served):
    server, _ = served
    cases = [
        (b"{not json", 400, "malformed JSON"),
        (b'["a cat"]', 422, "expected a JSON object"),
        (b'{"prompt": "a cat", "colour": 1}', 422, "unknown field 'colour'"),
        (b'{"prompt": "a photo of <ghost-cat>"}', 404, "not installed: ghost-cat"),
        (b'{"prompt": "a photo of dog-other"}', 422, "another-base"),
        (b'{"prompt": "a cat", "count": 5}', 422, '"count" must be between 1 and 4'),
        (b'{"prompt": "a cat", "steps": 11}', 422, '"steps" must be between 1 and 10'),
        (b'{"prompt": "a cat", "count": 2, "response": "png"}', 422, "a PNG response holds one image"),
        (b'{"prompt": "a cat", "seed": -1}', 422, '"seed" must be between'),
        (json.dumps({"prompt": "a cat " * 20000}).encode(), 413, "at most 65536"),
    ]
    for raw, status, message in cases:
        resp = post(server, None, raw=raw)
        assert resp[0] == status and message in error_of(resp), (raw[:60], resp)
    # errors only the loaded model can find fail their own job, not the others of the same batch
    good = {"prompt": "a photo of cat-mittens", "seed": 5, "response": "json"}
    bad_beta = {"prompt": "a photo of cat-mittens", "beta": {"chair-eames": 0.5}}
    bad_bind = {"prompt": "a photo of a dog", "concepts": ["chair-eames"]}
    answers = concurrently([lambda: post(server, good), lambda: post(server, bad_beta), lambda: post(server, bad_bind)])
    assert answers[0][0] == 200, answers[0][2][:300]
    assert answers[1][0] == 422 and "does not use" in error_of(answers[1])
    assert answers[2][0] == 422 and "no 'chair'" in error_of(answers[2])
    assert json.loads(request(server, "GET", "/health")[2])["status"] == "ok"
    assert post(server, {"prompt": "a photo of chair-eames", "seed": 6})[0] == 200


def test_a_client_that_disconnects_loses_nothing_for_the_others(served, toy_base):
    server, service = served
    body = json.dumps({"prompt": "a photo of chair-eames", "seed": 7}).encode()

    def leave():
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /render HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.3)
        s.close()  # gone before the batch window closes
        return "left"

    stayers = [{"prompt": "a photo of cat-mittens", "seed": 8, "response": "json"},
               {"prompt": "cat-mittens on chair-eames", "seed": 9, "response": "json"}]
    dropped = service.worker.stats["dropped"]
    with UnetBatches(toy_base.pipe.unet) as rec:
        answers = concurrently([leave] + [lambda b=b: post(server, b) for b in stayers])
    assert [a[0] for a in answers[1:]] == [200, 200]
    assert [json.loads(a[2])["concepts"] for a in answers[1:]] == [["cat-mittens"], ["cat-mittens", "chair-eames"]]
    assert service.worker.stats["dropped"] == dropped + 1  # its job never reached the UNet
    assert rec.sizes == [2 * 2] * STEPS
    # a client that leaves while its batch renders: the others of that batch still get theirs
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /render HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(body) + body)
    late = concurrently([lambda: (time.sleep(WINDOW_S + 0.2), s.close()), lambda: post(server, stayers[0])])
    assert late[1][0] == 200
    assert post(server, {"prompt": "a photo of a cat", "seed": 10})[0] == 200


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_web_page_in_headless_chromium(served):
    if not _chromium():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python playwright package is not installed")
    server, _ = served
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=args)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            preview = page.locator('#concepts li[data-name="cat-mittens"] img')
            preview.wait_for(timeout=30_000)
            page.wait_for_function("() => document.querySelector('#concepts li[data-name=\"cat-mittens\"] img')"
                                   ".naturalWidth > 0", timeout=30_000)
            assert "toy" in page.locator("#base").inner_text()
            page.fill("#prompt", "")
            page.locator('#concepts li[data-name="chair-eames"]').click()
            assert page.input_value("#prompt") == "a photo of chair-eames"
            page.fill("#seed", "3")
            page.click("#render")
            done = page.locator(".result.done img")
            done.first.wait_for(timeout=120_000)
            assert page.evaluate("() => document.querySelector('.result.done img').naturalWidth") == 64
            assert "chair-eames (beta 0.7" in page.locator(".result.done .meta").inner_text()
            page.fill("#prompt", "a photo of <ghost-cat>")
            page.click("#render")
            page.wait_for_function("() => document.querySelector('#error').textContent.includes('not installed')",
                                   timeout=30_000)
            assert page.locator(".result.done").count() == 1
        finally:
            browser.close()


def test_serve_command_says_what_to_install_without_fastapi(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    monkeypatch.setenv("PFX_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "fastapi", None)
    res = CliRunner().invoke(cli, ["serve"])
    assert res.exit_code == 1 and "pip install 'perfusion-hub[serve]'" in res.output


def test_serve_command_listens_on_loopback_and_refuses_a_taken_port(tmp_path):
    env = {**os.environ, "PFX_HOME": str(tmp_path / "home"), "PFX_OFFLINE": "1"}
    env.pop("PFX_BASE", None)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--port", str(taken.getsockname()[1])],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    taken.close()
    assert busy.returncode == 1 and "cannot listen on 127.0.0.1" in busy.stderr and "Traceback" not in busy.stderr
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", "0", "--steps", "1"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "pfx serve: http://" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "pfx serve exited"
        url = line.split("pfx serve: ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["status"] == "ok"
        conn.request("POST", "/render", body=json.dumps({"prompt": "a red ball"}),
                     headers={"Content-Type": "application/json"})
        res = conn.getresponse()
        assert res.status == 200 and res.getheader("content-type") == "image/png"
        assert json.loads(Image.open(BytesIO(res.read())).text["pfx"])["steps"] == 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_registry_source_installs_missing_concepts_only_when_allowed(toy_base, tmp_path):
    """--install: a request naming a concept that is not installed fetches it from the configured remotes (the
    built-in sample registry here, a local folder); without it the request gets a 404 that says what to do."""
    from cli.cmd_serve import RegistrySource
    from cli.serve import ServeError

    home = str(tmp_path / "home")
    strict = RegistrySource(home, False, toy_base, install_missing=False)
    with pytest.raises(ServeError) as e:
        strict.resolve(["chair-eames"])
    assert e.value.status == 404 and "not installed: chair-eames" in e.value.message and "--install" in e.value.message
    eager = RegistrySource(home, False, toy_base, install_missing=True)
    concepts, cov = eager.resolve(["chair-eames"])
    assert [c.name for c in concepts] == ["chair-eames"] and cov is not None
    assert strict.names() == {"chair-eames"} and strict.preview("chair-eames")[1] == "image/png"
