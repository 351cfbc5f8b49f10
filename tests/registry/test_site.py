"""The static catalogue (`pfx registry site`) in a real browser: Debian's Chromium, driven headless by
Playwright (launched with executable_path=/usr/bin/chromium; no browser download), over a registry of
1,000 published concepts served from 127.0.0.1. Pages render with their cards, client-side search finds
one concept among them (downloading only a few small shards, the same bytes registry.site.query_plan
counts), every link of the index and of a package page resolves, user text cannot inject markup, and
`pfx registry compact` regenerates the catalogue.

Skipped, with the reason shown, only when chromium or playwright is missing (.ci/run installs both)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

from registry.remotes.base import name_hash
from registry.site import build_site, query_plan
from tests.kit.site import file_reader, make_signer, no_fsync, publish_one, synthetic_registry

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)",
                allow_module_level=True)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
N = 1000


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    with no_fsync():
        remote = synthetic_registry(root, N)
        stats = build_site(remote)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}/"
    yield {"root": root, "remote": remote, "base": base, "site": base + "site/", "stats": stats}
    srv.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    pg.close()
    assert not errors, f"script errors: {errors}"


def pkg_url(served, name: str, page: str = "index.html") -> str:
    h = name_hash(name)
    return f"{served['site']}p/{h[:2]}/{h}/{page}"


def search(page, served, query: str) -> list[str]:
    page.goto(served["site"] + "index.html")
    page.fill("#q", query)
    page.wait_for_function("document.getElementById('status').textContent.match(/concept|no concept/)")
    return page.eval_on_selector_all("#results li a", "els => els.map(e => e.textContent)")


def test_index_renders(page, served):
    assert served["stats"]["packages"] == N + 2
    page.goto(served["site"] + "index.html")
    assert page.title() == "pfx catalogue: synthetic"
    assert page.inner_text("h1") == "Concepts on synthetic"
    assert f"{N + 2:,} concepts" in page.inner_text("main")
    assert len(page.query_selector_all(".recent li")) == 20
    assert page.inner_text(".browse").split() == [str(i) for i in range(1, 12)]


def test_search_finds_one_concept_among_a_thousand(page, served):
    assert search(page, served, "quokka") == ["Zebra Quokka"]
    assert page.inner_text("#status") == "1 concept"
    got = page.evaluate("window.pfxSearchStats")
    plan = query_plan(file_reader(served["root"]), "quokka")
    assert plan["names"] == ["zebra-quokka"]
    assert got == {"requests": plan["requests"], "bytes": plan["bytes"]}  # the bench's model is the browser's
    assert got["bytes"] < 20_000, got  # meta + one term shard + one document shard, not the catalogue
    assert search(page, served, "quok") == ["Zebra Quokka"]  # words match by prefix
    assert search(page, served, "striped marsupial") == ["Zebra Quokka"]  # AND over words
    assert search(page, served, "zzzzqx") == [] and "no concept matches" in page.inner_text("#status")
    many = search(page, served, "cat")
    assert len(many) == 20 and "first 20" in page.inner_text("#status")


def test_search_result_links_to_the_package_page(page, served):
    search(page, served, "quokka")
    page.click("#results li a")
    page.wait_for_load_state()
    assert page.url == pkg_url(served, "zebra-quokka")
    assert page.inner_text("h1") == "Zebra Quokka"


def test_package_page_shows_the_card(page, served):
    page.goto(pkg_url(served, "zebra-quokka"))
    main = page.inner_text("main")
    assert "zebra-quokka@1.1.0" in main and "a striped marsupial, trained on nine photos" in main
    assert "pfx install zebra-quokka@1.1.0" in main and f"pfx remote add synthetic {served['remote'].url}" in main
    assert page.inner_text(".trigger") == "zebra-quokka"
    assert page.inner_text(".license") == "CC-BY-4.0"
    assert "commercial use of images allowed" in main and "no derivatives" in main and "credit: not stated" in main
    assert page.inner_text(".family").startswith("sd1 stable-diffusion-v1/perfusion")
    assert make_signer().keyid in page.inner_text(".signers")
    assert page.eval_on_selector_all(".versions a", "els => els.map(e => e.textContent)") == ["1.1.0", "1.0.0"]
    widths = page.eval_on_selector_all(".previews img", "els => els.map(e => e.complete && e.naturalWidth)")
    assert widths == [32]  # the preview blob, loaded by digest from blobs/sha256/..
    page.goto(pkg_url(served, "zebra-quokka", "1.0.0.html"))
    assert "trained on six photos" in page.inner_text("main") and "not signed" in page.inner_text(".signers")
    assert "Ann" in page.inner_text("main")


def _links(page) -> set[str]:
    return set(page.eval_on_selector_all(
        "a[href], link[href], script[src], img[src], form[action]",
        "els => els.map(e => e.href || e.src || e.action)"))


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_every_link_of_the_index_and_a_package_page_resolves(page, served):
    seen: dict[str, int] = {}
    for start in (served["site"] + "index.html", pkg_url(served, "zebra-quokka"),
                  pkg_url(served, "zebra-quokka", "1.0.0.html"), served["site"] + "browse/3.html"):
        page.goto(start)
        for link in _links(page):
            u = urljoin(start, link).split("#")[0]
            assert urlparse(u).netloc == urlparse(served["base"]).netloc, f"{start} links off-site: {u}"
            if u not in seen:
                seen[u] = _status(u)
    bad = {u: s for u, s in seen.items() if s != 200}
    assert not bad, bad
    assert len(seen) > 40
    assert any("/blobs/sha256/" in u for u in seen)  # previews by digest


def test_user_text_is_shown_as_text(page, served):
    page.goto(pkg_url(served, "evil-html"))
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.inner_text("h1") == "<i>Evil</i> <script>window.pwned = 3</script>"
    assert "<script>window.pwned = 1</script>" in page.inner_text(".desc")
    assert page.eval_on_selector_all("script", "els => els.length") == 1  # only the catalogue's own
    assert page.query_selector("main i") is None and page.query_selector("main b") is None
    assert search(page, served, "evil") == ["<i>Evil</i> <script>window.pwned = 3</script>"]
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.query_selector("#results img") is None


def test_compact_regenerates_the_catalogue(page, served):
    from registry.compact import compact

    remote = served["remote"]
    assert search(page, served, "yakety") == []
    with no_fsync():
        publish_one(remote, "yak-yakety", "1.0.0", 4242, superclass="dog",
                    edits={"title": "Yakety Yak", "description": "a yak", "license": "MIT"})
        stats = compact(remote)
    assert stats["site"]["packages"] == N + 3
    assert search(page, served, "yakety") == ["Yakety Yak"]
    meta = json.loads((served["root"] / "site" / "search" / "meta.json").read_bytes())
    assert meta["build"] == stats["site"]["build"] != served["stats"]["build"]
    builds = {p.name for p in (served["root"] / "site" / "search").iterdir() if p.is_dir()}
    assert builds == {meta["build"], served["stats"]["build"]}  # this build and the one before
