// pfx static catalogue: client-side search over a sharded static index (no server, no build step).
// The index lives under search/<build>/ beside the pages (registry/site.py writes it):
//   t/<first 2 characters of a term>.json   {term: [document ids]}      one shard per query word
//   d/<id / DOCS_PER_SHARD>.json             [[name, title, version, description, superclass, licence,
//                                             permissions, page], ...]  only the shards of shown results
// A query downloads one small term shard per word, then the document shards of at most LIMIT results.
// All user data is put into the page with textContent, never as HTML.
"use strict";
(function () {
  const root = document.documentElement.dataset.root || "./";
  for (const b of document.querySelectorAll("button.copy")) {
    b.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(b.dataset.text));
  }
  const box = document.getElementById("q");
  const out = document.getElementById("results");
  const status = document.getElementById("status");
  if (!box || !out) return;
  const LIMIT = 20;
  const cache = new Map();
  const stats = { requests: 0, bytes: 0 };
  window.pfxSearchStats = stats;
  let meta = null;

  async function getJSON(url) {
    if (cache.has(url)) return cache.get(url);
    const p = fetch(url, { cache: "no-cache" }).then(async (r) => {
      if (r.status === 404) return null;
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      const text = await r.text();
      stats.requests += 1;
      stats.bytes += new TextEncoder().encode(text).length;
      return JSON.parse(text);
    });
    cache.set(url, p);
    return p;
  }

  function tokens(q) {
    const stop = new Set(meta.stopwords);
    const words = (q.toLowerCase().match(/[a-z0-9]+/g) || []).filter((w) => w.length > 1 && !stop.has(w));
    return Array.from(new Set(words));
  }

  async function search(q) {
    if (!meta) meta = await getJSON(root + "search/meta.json");
    const base = root + "search/" + meta.build + "/";
    const words = tokens(q);
    if (!words.length) return { words, ids: [], total: 0 };
    let ids = null;
    const exact = new Map();
    for (const w of words) {
      const shard = (await getJSON(base + "t/" + w.slice(0, meta.prefix) + ".json")) || {};
      const hit = new Set();
      for (const [term, list] of Object.entries(shard)) {
        if (!term.startsWith(w)) continue;
        for (const id of list) {
          hit.add(id);
          if (term === w) exact.set(id, (exact.get(id) || 0) + 1);
        }
      }
      ids = ids === null ? hit : new Set([...ids].filter((x) => hit.has(x)));
    }
    const ranked = [...ids].sort((a, b) => (exact.get(b) || 0) - (exact.get(a) || 0) || a - b);
    return { words, ids: ranked.slice(0, LIMIT), total: ranked.length };
  }

  async function docs(ids) {
    const base = root + "search/" + meta.build + "/";
    const rows = [];
    for (const id of ids) {
      const shard = await getJSON(base + "d/" + Math.floor(id / meta.docs_per_shard) + ".json");
      rows.push(shard[id % meta.docs_per_shard]);
    }
    return rows;
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function flags(perms) {
    const span = el("span");
    for (const [k, label] of [["allow_commercial", "commercial"], ["allow_derivatives", "derivatives"],
                              ["require_credit", "credit"]]) {
      if (perms[k] === undefined) continue;
      span.appendChild(el("span", (perms[k] ? "" : "no ") + label, "flag " + (perms[k] ? "yes" : "no")));
    }
    return span;
  }

  async function run() {
    const q = box.value;
    out.replaceChildren();
    if (!q.trim()) { status.textContent = ""; return; }
    status.textContent = "searching…";
    try {
      const res = await search(q);
      const rows = await docs(res.ids);
      if (box.value !== q) return;
      status.textContent = res.total === 0 ? "no concept matches " + JSON.stringify(q)
        : res.total + " concept" + (res.total === 1 ? "" : "s") + (res.total > rows.length ? ", first " + rows.length : "");
      for (const [name, title, version, desc, superclass, licence, perms, page] of rows) {
        const li = el("li", undefined, "card");
        const a = el("a", title);
        a.href = root + page;
        li.appendChild(a);
        li.appendChild(el("span", " " + name + "@" + version + " · " + superclass + (licence ? " · " + licence : ""), "muted"));
        li.appendChild(el("div", desc, "desc"));
        li.appendChild(flags(perms));
        out.appendChild(li);
      }
    } catch (err) {
      status.textContent = "search failed: " + err.message + " (the index is read with fetch(): serve the registry over http(s))";
    }
  }

  let timer = null;
  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 150); });
  const form = box.form;
  if (form) form.addEventListener("submit", (e) => { e.preventDefault(); run(); });
  const initial = new URLSearchParams(location.search).get("q");
  if (initial) { box.value = initial; run(); }

})();
