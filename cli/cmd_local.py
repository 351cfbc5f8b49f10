"""Local commands: list, remove, verify, gc, du, lock, export, import.

None of these touch the network or import torch: they work on the home folder only, so they start
fast and behave identically offline.
"""

from __future__ import annotations

import click

from cli.output import emit, json_option, progress, table
from registry.errors import IntegrityError, UsageError
from registry.names import parse_ref


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _home(ctx: click.Context):
    return ctx.obj.home  # ctx.obj is cli.main.Context; the home opens on first use


@click.command("list")
@click.argument("name", required=False)
@json_option
@click.pass_context
def list_cmd(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """List installed concepts (optionally only NAME's versions)."""
    rows = _home(ctx).installed(name)

    def human(rows):
        if not rows:
            click.echo("nothing installed (try `pfx install cat-mittens`)", err=True)
            return
        for r in rows:
            r["_size"] = _size(r["size"])
            r["_flags"] = ",".join(f for f, on in (("yanked", r["yanked"]), ("pinned", r["pinned"])) if on)
            r["_remote"] = r["remote"] or "local"
        table(rows, [("name", "NAME"), ("version", "VERSION"), ("_size", "SIZE"), ("base_name", "BASE"),
                     ("trigger", "TRIGGER"), ("_remote", "FROM"), ("installed_at", "INSTALLED"), ("_flags", "")])

    emit(rows, as_json, human)


@click.command("remove")
@click.argument("refs", nargs=-1, required=True, metavar="NAME[@VERSION]...")
@json_option
@click.pass_context
def remove_cmd(ctx: click.Context, refs: tuple[str, ...], as_json: bool) -> None:
    """Forget installed versions (all of NAME, or NAME@VERSION). `pfx gc` then frees the space."""
    home = _home(ctx)
    removed = []
    for text in refs:
        ref = parse_ref(text)
        if ref.kind == "default":
            removed += home.remove(ref.name)
        elif ref.kind == "version":
            removed += home.remove(ref.name, ref.selector)
        elif ref.kind == "digest":
            row = home.find_installed(ref)
            if row is None:
                from registry.errors import NotFound

                raise NotFound(f"{text} is not installed")
            removed += home.remove(row["name"], row["version"])
        else:
            raise UsageError(f"remove takes NAME, NAME@VERSION or NAME@sha256:..., not a range or tag ({text})")
    out = [{"name": r["name"], "version": r["version"], "manifest": r["manifest"]} for r in removed]
    emit(out, as_json, lambda rs: click.echo("\n".join(f"removed {r['name']}@{r['version']}" for r in rs)
                                           + "\n(run `pfx gc` to free disk space)"))


@click.command("verify")
@click.option("--fix", is_flag=True, help="Delete corrupt blobs so that a reinstall fetches them again.")
@json_option
@click.pass_context
def verify_cmd(ctx: click.Context, fix: bool, as_json: bool) -> None:
    """Re-hash every blob and manifest the installed versions use."""
    from registry.local_ops import verify

    home = _home(ctx)
    n = home.index.conn.execute("SELECT count(*) FROM installed").fetchone()[0]
    with progress(n * 2, "verifying") as bar:
        report = verify(home, fix=fix, progress=bar.update)

    def human(r):
        click.echo(f"checked {r['checked']} objects ({_size(r['bytes'])}) of {r['installed']} installed "
                   f"versions in {r['seconds']:.2f} s")
        for kind in ("missing", "corrupt", "bad_manifest", "index_mismatch"):
            for item in r[kind]:
                click.echo(f"  {kind}: {item['role']} {item['digest']} (used by {', '.join(item['used_by'])})")
        for d in r["fixed"]:
            click.echo(f"  deleted {d}")
        for item in r.get("untrusted", []):
            click.echo(f"  untrusted: {', '.join(item['used_by'])}: {item['detail']}")

    emit(report, as_json, human)
    for w in report.get("trust_warnings", []):
        click.echo(f"warning: {w}", err=True)
    if not report["ok"] and not any(report[k] for k in ("missing", "corrupt", "bad_manifest", "index_mismatch")):
        from registry.errors import Untrusted

        users = sorted({u for i in report["untrusted"] for u in i["used_by"]})
        raise Untrusted(f"verify: {len(users)} installed version(s) lack a valid signature by a trusted key: "
                        f"{', '.join(users[:5])}{' ...' if len(users) > 5 else ''}",
                        hint="trust the publisher (pfx key trust NAMESPACE KEY), or remove them")
    if not report["ok"]:
        bad = sum(len(report[k]) for k in ("missing", "corrupt", "bad_manifest", "index_mismatch"))
        users = sorted({u for k in ("missing", "corrupt", "bad_manifest", "index_mismatch") for i in report[k]
                        for u in i["used_by"]})
        raise IntegrityError(f"verify found {bad} problem(s) affecting {', '.join(users[:5])}"
                             f"{' ...' if len(users) > 5 else ''}",
                             hint=("reinstall them: pfx remove NAME@V && pfx install NAME@V" if fix
                                   else "run `pfx verify --fix`, then reinstall the affected versions"))
    elif not as_json:
        click.echo("ok")


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--grace", "grace", type=float, default=None, metavar="SECONDS",
              help="Keep unreferenced blobs younger than this (default 900: protects installs in flight).")
@json_option
@click.pass_context
def gc_cmd(ctx: click.Context, dry_run: bool, grace: float | None, as_json: bool) -> None:
    """Delete blobs no installed version references."""
    from registry.local_ops import GC_GRACE_S, gc

    if grace is not None and grace < 0:
        raise UsageError("--grace must be >= 0")
    report = gc(_home(ctx), grace_s=GC_GRACE_S if grace is None else grace, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    emit(report, as_json, lambda r: click.echo(
        f"{verb} {r['removed']} blob(s), {_size(r['bytes_freed'])}"
        + (f"; kept {r['kept_recent']} recent unreferenced blob(s)" if r["kept_recent"] else "")
        + (f"; {r['tmp_removed']} stale temp file(s)" if r["tmp_removed"] else "")
        + (f"; {len(r['work_tmp_removed'])} stale training temp item(s)" if r["work_tmp_removed"] else "")))


@click.command("du")
@json_option
@click.pass_context
def du_cmd(ctx: click.Context, as_json: bool) -> None:
    """Disk usage of the home folder by kind."""
    from registry.local_ops import du

    report = du(_home(ctx))

    def human(r):
        rows = [{"kind": k, "size": _size(v), "count": r["blobs"].get(k, "")} for k, v in r["bytes"].items()]
        table(rows, [("kind", "KIND"), ("size", "SIZE"), ("count", "BLOBS")])
        click.echo(f"{r['installed']} installed version(s) in {r['home']}")

    emit(report, as_json, human)


@click.command("lock")
@click.argument("refs", nargs=-1, metavar="[REF]...")
@click.option("-o", "--output", default="pfx.lock", show_default=True, type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def lock_cmd(ctx: click.Context, refs: tuple[str, ...], output: str, as_json: bool) -> None:
    """Write a lockfile pinning the installed versions (or REFs) by manifest, blob and base digest."""
    from registry.lockfile import write_lock

    entries = write_lock(_home(ctx), output, list(refs) or None)
    emit({"lockfile": output, "concepts": entries}, as_json,
         lambda d: click.echo(f"wrote {d['lockfile']} ({len(d['concepts'])} concept(s))"))


@click.command("export")
@click.argument("bundle", type=click.Path())
@click.argument("refs", nargs=-1, metavar="[REF]...")
@json_option
@click.pass_context
def export_cmd(ctx: click.Context, bundle: str, refs: tuple[str, ...], as_json: bool) -> None:
    """Export installed concepts (all, or REFs) as an offline bundle: a folder, or a .tar/.tar.gz."""
    from registry.bundle import export_bundle

    home = _home(ctx)
    total = len(refs) if refs else len(home.installed())
    with progress(total, "exporting") as bar:
        out = export_bundle(home, bundle, list(refs) or None, progress=bar.update)
    emit(out, as_json, lambda d: click.echo(f"exported {len(d['concepts'])} concept(s) to {d['bundle']}"))


@click.command("import")
@click.argument("bundle", type=click.Path(exists=True))
@json_option
@click.pass_context
def import_cmd(ctx: click.Context, bundle: str, as_json: bool) -> None:
    """Verify and install everything in an offline bundle (folder or tar written by `pfx export`)."""
    from registry.bundle import import_bundle

    out = import_bundle(_home(ctx), bundle)
    for w in out.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    emit(out, as_json, lambda d: click.echo(
        f"imported {len(d['imported'])} concept(s)"
        + (f", {len(d['already_installed'])} already installed" if d["already_installed"] else "")
        + "".join(f"\n  {e['name']}@{e['version']}" for e in d["imported"])))


COMMANDS = (list_cmd, remove_cmd, verify_cmd, gc_cmd, du_cmd, lock_cmd, export_cmd, import_cmd)


def register(cli: click.Group) -> None:
    for cmd in COMMANDS:
        cli.add_command(cmd)
