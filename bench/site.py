"""Static catalogue benchmark (not a test): python -m bench.site [--concepts 10000] [--browser]

Publishes N small carded concepts into a file:// registry (tests/sitekit.py: synthetic names, titles,
descriptions and tags from small word lists, like a catalogue of many similar concepts), builds the
static catalogue (`registry.site.build_site`, fsync on), and measures what the client-side search
downloads per query: registry.site.query_plan mirrors site_assets/search.js fetch for fetch (the browser
test asserts the two agree byte for byte). Reports raw bytes (what a plain static server sends) and the
gzip size of the same files (what a compressing CDN would send). Goal: <= 300 KB per query.

--browser also runs the queries in headless Chromium (Playwright, /usr/bin/chromium) against the
served folder and records the bytes the page's own counter saw.

Results go to bench/results/site-<yyyy-mm-dd>.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUERIES = [
    "quokka",             # one concept among N (rare word)
    "quok",               # the same by prefix
    "cat",                # a common word: many hits, 20 shown
    "orange cat",         # two common words, AND
    "sleepy striped dog", # three words
    "c0",                 # a two-letter prefix that matches every name
    "zebra quokka marsupial",
    "painted teapot",
    "mit",                # licence word
    "xyzzy",              # no hit
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=10_000)
    ap.add_argument("--browser", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"site-{date.today().isoformat()}.json"))
    args = ap.parse_args()

    from registry.site import build_site, query_plan
    from tests.kit.site import file_reader, no_fsync, synthetic_registry

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "registry"
        t0 = time.perf_counter()
        with no_fsync():  # setup only; the build below runs with fsync
            remote = synthetic_registry(root, args.concepts)
        publish_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = build_site(remote)
        build_s = time.perf_counter() - t0
        get = file_reader(root)
        site = root / "site"
        files = [p for p in site.rglob("*") if p.is_file()]
        index_files = [p for p in (site / "search" / stats["build"]).rglob("*") if p.is_file()]
        term = [p.stat().st_size for p in index_files if p.parent.name == "t"]
        docs = [p.stat().st_size for p in index_files if p.parent.name == "d"]
        rows = []
        for q in QUERIES:
            fetched: dict[str, bytes] = {}

            def rec(path: str, fetched=fetched) -> bytes | None:
                data = get(path)
                if data is not None:
                    fetched[path] = data
                return data

            t0 = time.perf_counter()
            plan = query_plan(rec, q)
            ms = (time.perf_counter() - t0) * 1000
            rows.append({"query": q, "hits": plan["total"], "shown": len(plan["names"]), "requests": plan["requests"],
                         "bytes": plan["bytes"], "gzip_bytes": sum(len(gzip.compress(v, 6)) for v in fetched.values()),
                         "largest_file": max(len(v) for v in fetched.values()), "python_ms": round(ms, 1)})
            print(f"{q!r:28} hits {plan['total']:6}  requests {plan['requests']:3}  {plan['bytes'] / 1024:8.1f} KB"
                  f"  (gzip {rows[-1]['gzip_bytes'] / 1024:6.1f} KB)")
        browser = None
        if args.browser:
            browser = run_browser(root, QUERIES)
            for r in rows:
                r["browser_bytes"] = browser[r["query"]]["bytes"]
        result = {
            "date": date.today().isoformat(), "concepts": args.concepts, "packages": stats["packages"],
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "publish_seconds_no_fsync": round(publish_s, 1), "build_seconds": round(build_s, 1),
            "site_files": len(files), "site_bytes": sum(p.stat().st_size for p in files),
            "index_files": len(index_files), "index_bytes": sum(p.stat().st_size for p in index_files),
            "term_shards": {"count": len(term), "median_bytes": int(statistics.median(term)), "max_bytes": max(term)},
            "doc_shards": {"count": len(docs), "median_bytes": int(statistics.median(docs)), "max_bytes": max(docs)},
            "queries": rows,
            "max_bytes_per_query": max(r["bytes"] for r in rows),
            "median_bytes_per_query": int(statistics.median(r["bytes"] for r in rows)),
            "goal_bytes_per_query": 300 * 1024,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"max {result['max_bytes_per_query'] / 1024:.1f} KB, median {result['median_bytes_per_query'] / 1024:.1f} KB"
              f" per query; build {build_s:.1f} s; wrote {args.out}")


def run_browser(root: Path, queries: list[str]) -> dict:
    import functools
    import http.server
    import threading

    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/site/index.html"
    out = {}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        for q in queries:
            pg = b.new_page()
            pg.goto(url)
            pg.fill("#q", q)
            pg.wait_for_function("document.getElementById('status').textContent.match(/concept|no concept/)")
            out[q] = pg.evaluate("window.pfxSearchStats")
            pg.close()
        b.close()
    srv.shutdown()
    return out


if __name__ == "__main__":
    main()
