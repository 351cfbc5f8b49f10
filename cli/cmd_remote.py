"""Commands that talk to remotes: install, search, info, publish, yank, tag, remote, registry.

Thin wrappers over registry.install / publish / resolve / compact; nothing here imports torch or
diffusers, so these commands start fast. Errors are PfxError subclasses that cli.main maps to a
message and a stable exit code.
"""

from __future__ import annotations

from contextlib import ExitStack

import click

from cli.cmd_card import describe_card, filter_options
from cli.output import emit, json_option, progress, table
from registry.errors import OfflineError, PfxError


def _home(ctx: click.Context):
    return ctx.obj.home


class _Bar:
    """Adapts install's (bytes, total) callback to one aggregate progress bar, opened lazily once the
    total is known, and silent when not on a terminal (cli.output.progress decides)."""

    def __init__(self, stack: ExitStack, label: str):
        self.stack, self.label, self.bar = stack, label, None

    def __call__(self, n: int, total: int) -> None:
        if self.bar is None:
            self.bar = self.stack.enter_context(progress(total, self.label))
        self.bar.update(n)


def _warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


def _notes(res: dict) -> None:
    """The warnings and repairs a write reports (single-writer mode, unlisted publishes completed)."""
    for w in res.get("warnings", []):
        _warn(w)
    for ref in res.get("completed", []):
        click.echo(f"completed the interrupted publish of {ref} (now listed)", err=True)


# --------------------------------------------------------------------------------------------------
# install / search / info


@click.command()
@click.argument("refs", nargs=-1)
@click.option("-r", "--requirements", "lock", type=click.Path(dir_okay=False), help="Install exactly a pfx.lock.")
@click.option("--remote", help="Only this remote (default: every remote in order, then 'sample').")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(1, 64), help="Parallel downloads.")
@json_option
@click.pass_context
def install(ctx, refs, lock, remote, workers, as_json):
    """Install concepts: NAME, NAME@1.2.0, NAME@^1.2, NAME@latest, NAME@sha256:..., or -r pfx.lock."""
    from registry.install import install as do_install

    home = _home(ctx)
    with ExitStack() as stack:
        results = do_install(home, list(refs), lock=lock, remote=remote, workers=workers,
                             progress=_Bar(stack, "downloading"))

    def human(rows):
        for r in rows:
            where = f" from {r['remote']}" if r["status"] == "installed" and r.get("remote") else ""
            note = " (yanked)" if r.get("yanked") else ""
            verb = "installed" if r["status"] == "installed" else "already installed:"
            click.echo(f"{verb} {r['name']}@{r['version']}{where}{note}")

    for r in results:
        if r.get("warning"):
            _warn(r["warning"])
    emit(results, as_json, human)


@click.command()
@click.argument("query")
@click.option("--remote", help="Search this remote only (default: installed concepts, then every remote).")
@click.option("--local", "local_only", is_flag=True, help="Search installed concepts only.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 200))
@filter_options
@json_option
@click.pass_context
def search(ctx, query, remote, local_only, limit, filters, as_json):
    """Search concepts by name, description, trigger, superclass and tags; the filters narrow by card
    (superclass, base family, licence and permission flags, signed). QUERY may be '' with a filter."""
    from registry.install import candidate_remotes
    from registry.remotes import OfflineRemote
    from registry.search import search_remote

    home = _home(ctx)
    rows: list[dict] = []
    if not remote:
        for r in home.search(query, limit, **filters):
            rows.append({"name": r["name"], "version": r["version"], "description": r.get("description", ""),
                         "source": "installed", **{k: r[k] for k in ("title", "license", "superclass",
                                                                    "base_family", "permissions", "signers")
                                                   if k in r}})
    if not local_only:
        for rem in candidate_remotes(home, remote):
            if isinstance(rem, OfflineRemote):
                if remote:
                    raise OfflineError(f"offline: cannot search remote '{rem.name}'",
                                       hint="drop --offline / PFX_OFFLINE, or search installed concepts")
                continue
            try:
                found = search_remote(rem, query, limit, **filters)
            except PfxError as e:
                if remote:
                    raise
                _warn(f"remote '{rem.name}': {str(e).splitlines()[0]}")
                continue
            for r in found:
                rows.append({"name": r["name"], "version": r.get("version", ""),
                             "description": r.get("description", ""), "source": rem.name,
                             **{k: r[k] for k in ("title", "license", "superclass", "base_family", "permissions",
                                                  "signers") if k in r}})

    def human(rs):
        if not rs:
            active = ", ".join(f"{k}={v}" for k, v in filters.items() if v is not None)
            click.echo(f"no concepts match {query!r}" + (f" with {active}" if active else ""))
            return
        table(rs, [("name", "NAME"), ("version", "VERSION"), ("source", "FROM"), ("description", "DESCRIPTION")])

    emit(rows[: limit * 4], as_json, human)


@click.command()
@click.argument("ref")
@click.option("--remote", help="Ask this remote (skips the installed copy).")
@json_option
@click.pass_context
def info(ctx, ref, remote, as_json):
    """Describe a concept: the installed version first, else what the remotes have."""
    from registry.install import remote_info

    home = _home(ctx)
    row = None if remote else home.find_installed(ref)
    if row is not None:
        m = home.manifest(row["manifest"])
        from registry.cards import card_view

        data = {"name": m.name, "version": m.version, "manifest": m.digest, "remote": row.get("remote"),
                "installed": True, "yanked": bool(row.get("yanked")), "trigger": m.trigger,
                "superclass": m.superclass, "description": m.description, "tags": list(m.tags),
                "license": m.license, "base": m.raw["base"], "size": m.total_size(), "blobs": m.blobs(),
                "card": card_view(home, m),
                "signers": [k for k, _ in home.index.signatures(m.digest)]}
    else:
        data = remote_info(home, ref, remote)

    def human(d):
        state = "installed" if d["installed"] else f"on remote {d['remote']}"
        click.echo(f"{d['name']}@{d['version']}  ({state}{', yanked' if d['yanked'] else ''})")
        for k in ("manifest", "trigger", "superclass", "description", "license"):
            if d.get(k):
                click.echo(f"  {k:<12}{d[k]}")
        click.echo(f"  {'base':<12}{d['base']['name']} ({d['base']['digest'][:19]}...)")
        click.echo(f"  {'size':<12}{d['size']} bytes in {len(d['blobs'])} blob(s)")
        if d.get("versions"):
            vs = ", ".join(v["version"] + (" (yanked)" if v["yanked"] else "") for v in d["versions"][-10:])
            click.echo(f"  {'versions':<12}{vs}")
        if d.get("dist_tags"):
            click.echo(f"  {'tags':<12}" + ", ".join(f"{t}={v}" for t, v in sorted(d["dist_tags"].items())))
        if d.get("signers"):
            click.echo(f"  {'signed by':<12}{', '.join(d['signers'])}")
        if d.get("card"):
            click.echo("card:")
            click.echo("\n".join(describe_card(d["card"])))

    emit(data, as_json, human)


# --------------------------------------------------------------------------------------------------
# publish / yank / tag


@click.command()
@click.argument("ref")
@click.option("--to", "to", help="Remote to publish to (default: your default remote).")
@click.option("--no-latest", is_flag=True, help="Do not move the 'latest' tag.")
@click.option("--sign/--no-sign", default=None,
              help="Sign the manifest digest (default: sign when you have a default key, see `pfx key`).")
@click.option("--key", "key_name", help="Sign with this key (from `pfx key list`).")
@json_option
@click.pass_context
def publish(ctx, ref, to, no_latest, sign, key_name, as_json):
    """Publish a local NAME[@VERSION] to a remote (never overwrites a published version)."""
    from registry.publish import publish as do_publish

    res = do_publish(_home(ctx), ref, to=to, move_latest=not no_latest, sign=sign, key=key_name)
    _notes(res)

    def human(r):
        how = "completed an interrupted publish of" if r["resumed"] else "published"
        signed = f", signed by {r['signed_by'][0][:12]}" if r.get("signed_by") else ""
        click.echo(f"{how} {r['name']}@{r['version']} to {r['remote']} ({r['manifest'][:19]}...{signed})")

    emit(res, as_json, human)


@click.command()
@click.argument("ref")
@click.option("--remote", help="Remote to edit (default: your default remote).")
@click.option("--undo", is_flag=True, help="Un-yank.")
@json_option
@click.pass_context
def yank(ctx, ref, remote, undo, as_json):
    """Yank NAME@VERSION: still installable exactly or from a lockfile, never chosen by a range or tag."""
    from registry.publish import yank as do_yank

    res = do_yank(_home(ctx), ref, remote_name=remote, undo=undo)
    _notes(res)
    emit(res, as_json, lambda r: click.echo(
        f"{'yanked' if r['yanked'] else 'un-yanked'} {r['name']}@{r['version']} on {r['remote']}"))


@click.command(name="tag")
@click.argument("ref")
@click.argument("tag_name", metavar="TAG")
@click.option("--remote", help="Remote to edit (default: your default remote).")
@json_option
@click.pass_context
def tag_cmd(ctx, ref, tag_name, remote, as_json):
    """Point TAG (e.g. stable) at the version REF selects."""
    from registry.publish import tag as do_tag

    res = do_tag(_home(ctx), ref, tag_name, remote_name=remote)
    _notes(res)
    emit(res, as_json, lambda r: click.echo(f"{r['name']}@{r['tag']} -> {r['version']} on {r['remote']}"))


# --------------------------------------------------------------------------------------------------
# remote add / list / remove


@click.group()
def remote():
    """Manage remotes (s3://bucket/prefix or file:///path), tried in order; 'sample' is built in."""


def _show_probe(d: dict, single_writer: bool) -> None:
    """The probe's findings, one line per capability, then what pfx will do (`remote add` / `probe`)."""
    from registry.capabilities import describe, lacking, single_writer_command

    p = d["probe"]
    if p.get("skipped"):
        click.echo(f"  probe skipped: {p.get('reason')}")
        return
    if p.get("error"):
        _warn(f"could not probe {d['name']}: {p['error']} (nothing recorded; it is probed again before "
              "the next publish)")
        return
    for line in describe(p):
        click.echo(f"  {line}")
    if p["ok"]:
        note = " (single-writer mode set; the headers are sent anyway)" if single_writer else ""
        click.echo(f"  conditional writes: ok (safe for concurrent publishers){note}")
    elif single_writer:
        _warn(f"{d['name']} does not honour {' and '.join(lacking(p))}: publishing in single-writer mode "
              "(pfx checks before it writes; you must be its only publisher)")
    else:
        _warn(f"{d['name']} does not honour {' and '.join(lacking(p))}: installs work, but publish, yank, tag "
              f"and compact are refused (concurrent publishers could overwrite each other). If you are its "
              f"only publisher: {single_writer_command(d)}")


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--endpoint-url", help="S3 endpoint (MinIO, R2, ...); default AWS_ENDPOINT_URL or AWS.")
@click.option("--profile", help="AWS profile for this remote's credentials.")
@click.option("--default", "make_default", is_flag=True, help="Make it the default publish target.")
@click.option("--single-writer", is_flag=True, help="Allow publishing to a store without conditional writes "
              "(only safe when you are its only publisher).")
@json_option
@click.pass_context
def remote_add(ctx, name, url, endpoint_url, profile, make_default, single_writer, as_json):
    """Add a remote and probe its conditional writes (needed for safe publishing)."""
    home = _home(ctx)
    row = home.add_remote(name, url, endpoint_url=endpoint_url, profile=profile,
                          single_writer=single_writer, default=make_default)
    out = {**row, "probe": _probe_row(home, row)}
    emit(out, as_json, lambda d: (click.echo(f"added remote {d['name']} {d['url']}"
                                             f"{' (default)' if d.get('default') else ''}"),
                                  _show_probe(d, single_writer)))


def _probe_row(home, row: dict) -> dict:
    """Probe a configured remote and record a complete result (a failed probe is never recorded)."""
    from registry.capabilities import probe, record_probe
    from registry.remotes import open_remote

    try:
        rem = open_remote(row, offline=home.offline)
    except PfxError as e:  # e.g. a profile that does not exist (yet): the remote is added, not probed
        return {"error": str(e).splitlines()[0], "ok": False}
    if home.offline and not row["url"].startswith("file://"):
        return {"skipped": True, "reason": "offline: it will be probed before the first publish"}
    if rem.read_only:
        return {"skipped": True, "reason": "read-only remote"}
    result = probe(rem)
    record_probe(home, rem, result)
    return result


@remote.command("probe")
@click.argument("name")
@json_option
@click.pass_context
def remote_probe(ctx, name, as_json):
    """Probe a remote's conditional writes again (after the store changed) and record the result."""
    from registry.errors import RemoteError

    home = _home(ctx)
    row = home.get_remote(name)
    out = {**row, "probe": _probe_row(home, row)}
    emit(out, as_json, lambda d: (click.echo(f"probed remote {d['name']} {d['url']}"),
                                  _show_probe(d, bool(row.get("single_writer")))))
    if out["probe"].get("error"):
        raise RemoteError(f"could not probe {name}: {out['probe']['error']}")


@remote.command("list")
@json_option
@click.pass_context
def remote_list(ctx, as_json):
    """List remotes in the order installs try them."""
    from registry.capabilities import mode, recorded_probe

    home = _home(ctx)
    rows = []
    for r in home.list_remotes():
        caps = recorded_probe(home, r)
        rows.append({**r, "probe": caps, "mode": mode(r, caps)})

    def human(rs):
        table([{**r, "default": "*" if r.get("default") else ""} for r in rs],
              [("default", ""), ("name", "NAME"), ("url", "URL"), ("endpoint_url", "ENDPOINT"), ("mode", "PUBLISH")])

    emit(rows, as_json, human)


@remote.command("remove")
@click.argument("name")
@click.pass_context
def remote_remove(ctx, name):
    """Forget a remote (nothing on the remote is touched)."""
    _home(ctx).remove_remote(name)
    click.echo(f"removed remote {name}")


# --------------------------------------------------------------------------------------------------
# registry compact


@click.group()
def registry():
    """Maintenance of a remote registry."""


@registry.command("compact")
@click.argument("remote_name", required=False)
@click.option("--rebuild", is_flag=True, help="Also rebuild every package index from the claims (LISTs the store).")
@json_option
@click.pass_context
def registry_compact(ctx, remote_name, rebuild, as_json):
    """Fold recent publishes into the remote's search shards and repair lagging package indexes."""
    from registry.compact import compact
    from registry.publish import writable_remote

    rem, warnings, completed = writable_remote(_home(ctx), remote_name, "compact")
    stats = compact(rem, rebuild=rebuild)
    stats.update(remote=rem.name, warnings=warnings, completed=completed)
    _notes(stats)
    emit(stats, as_json, lambda s: click.echo(
        f"compacted {s['remote']}: {s['events']} event(s), {s['packages']} package(s) indexed, "
        f"{s['repaired']} version(s) repaired"
        + (f"; catalogue rewritten ({s['site']['packages']} package(s))" if s.get("site") else "")))


@registry.command("site")
@click.argument("remote_name", required=False)
@json_option
@click.pass_context
def registry_site(ctx, remote_name, as_json):
    """Write a static catalogue of the remote into it under site/ (index, a page per package and
    version, client-side search); `pfx registry compact` keeps it up to date from then on."""
    from registry.publish import target_remote
    from registry.site import build_site

    rem = target_remote(_home(ctx), remote_name)
    stats = build_site(rem, warn=_warn)
    url = rem.url.rstrip("/") + "/site/index.html"
    stats["url"] = url

    def human(s):
        click.echo(f"wrote the catalogue of {s['remote']}: {s['packages']} package(s), {s['versions']} version(s), "
                   f"{s['index_files']} search index file(s) ({s['index_bytes']:,} bytes) in {s['seconds']} s")
        click.echo(f"  {url}")
        if url.startswith("file://"):
            root = url[len("file://"):].removesuffix("/site/index.html")
            click.echo(f"  search needs http: python3 -m http.server -d {root} 8000, then "
                       "http://127.0.0.1:8000/site/index.html")

    emit(stats, as_json, human)


def register(cli: click.Group) -> None:
    for cmd in (install, search, info, publish, yank, tag_cmd, remote, registry):
        cli.add_command(cmd)
