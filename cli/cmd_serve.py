"""`pfx serve`: the HTTP service of cli/serve.py over the installed concepts of a pfx home.

FastAPI and uvicorn are an optional extra (`pip install 'perfusion-hub[serve]'`); the command says so when they
are missing. torch/diffusers are imported inside the command body only.
"""

from __future__ import annotations

import threading

import click

from cli.engine_store import base_covariance, base_value, concepts_for, installed_concepts, open_base
from registry.errors import PfxError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class RegistrySource:
    """Installed concepts of a pfx home, for cli.serve (called from several request threads: each thread opens
    its own registry Home, whose SQLite connection belongs to it). Concepts checked against the base and their
    covariance are kept per set of installed files, so a repeated request reads nothing."""

    def __init__(self, home_path, offline: bool, base, *, install_missing: bool):
        self.home_path, self.offline, self.base, self.install_missing = home_path, offline, base, install_missing
        self._local = threading.local()
        self._lock = threading.Lock()
        self._resolved: dict[tuple, tuple[list, object]] = {}

    def _ctx(self):
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            from cli.main import Context

            ctx = self._local.ctx = Context(self.home_path, self.offline, False)
        return ctx

    def names(self) -> set[str]:
        return {r["name"] for r in self._ctx().home.installed()}

    def _default_rows(self) -> list[dict]:
        home = self._ctx().home
        names = sorted({r["name"] for r in home.installed()})
        return [row for row in (home.find_installed(n) for n in names) if row is not None]

    def listing(self) -> list[dict]:
        from urllib.parse import quote

        home = self._ctx().home
        ok_bases = {self.base.digest} | set(self.base.compatible)
        out = []
        for row in self._default_rows():
            m = home.manifest(row["manifest"])
            out.append({"name": row["name"], "version": row["version"], "superclass": row.get("superclass"),
                        "trigger": row.get("trigger"), "description": row.get("description") or "",
                        "license": row.get("license") or "", "for_this_base": row.get("base_digest") in ok_bases,
                        "preview": f"/concepts/{quote(row['name'])}/preview" if m.previews else None})
        return out

    def resolve(self, names: list[str]):
        from cli.serve import ServeError
        from perfusion_hub.concept import ConceptFormatError, ConceptMismatchError
        from registry.errors import NotFound, OfflineError, UsageError

        ctx = self._ctx()
        try:
            pairs = installed_concepts(ctx, names, install_missing=self.install_missing and not self.offline)
        except (NotFound, OfflineError) as e:
            hint = "" if self.install_missing else "; install it with `pfx install`, or start pfx serve with --install"
            raise ServeError(404, f"{str(e).splitlines()[0]}{hint}") from None
        except UsageError as e:
            raise ServeError(422, str(e)) from None
        key = tuple(m.concept["digest"] for _, m in pairs)
        with self._lock:
            hit = self._resolved.get(key)
        if hit is None:
            try:
                hit = concepts_for(ctx, self.base, pairs)
            except ConceptMismatchError as e:
                raise ServeError(422, str(e)) from None
            except (ConceptFormatError, PfxError) as e:
                raise ServeError(422 if not isinstance(e, NotFound) else 404, str(e)) from None
            with self._lock:
                if len(self._resolved) > 256:
                    self._resolved.clear()
                self._resolved[key] = hit
        return hit

    def preview(self, name: str):
        from registry.errors import PfxError as Error

        home = self._ctx().home
        try:
            row = home.find_installed(name)
        except Error:
            return None
        if row is None:
            return None
        previews = home.manifest(row["manifest"]).previews
        if not previews:
            return None
        return home.store.read_bytes(previews[0]["digest"]), previews[0].get("media_type", "image/png")


def register(cli: click.Group) -> None:
    cli.add_command(serve)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8700, show_default=True)
@click.option("--base", help="Base model (default: PFX_BASE, config, else the embedded base).")
@click.option("--device", help="cuda, cpu, mps (untested) or auto.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False))
@click.option("--install", "install_missing", is_flag=True,
              help="Install concepts a request names (<name> or \"concepts\") that are missing, from the remotes.")
@click.option("--steps", type=click.IntRange(1, 1000), help="Default denoising steps (25 toy, 50 otherwise).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Images per denoising batch.")
@click.option("--batch-window-ms", type=click.FloatRange(0, 10_000), default=20, show_default=True,
              help="How long a batch waits for more requests.")
@click.option("--max-count", type=click.IntRange(1, 64), default=8, show_default=True, help="Images per request.")
@click.option("--max-steps", type=click.IntRange(1, 1000), default=150, show_default=True)
@click.option("--max-queue", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Images waiting before requests get 503.")
@click.pass_obj
def serve(obj, host, port, base, device, dtype, tokenizer, install_missing, steps, max_batch, batch_window_ms,
          max_count, max_steps, max_queue):
    """Serve renders over HTTP: a web page at /, POST /render, GET /concepts, GET /health.

    Concurrent requests with different concepts share each denoising batch. Listens on 127.0.0.1 unless --host
    says otherwise. Needs the serve extra: pip install 'perfusion-hub[serve]'.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise PfxError(f"pfx serve needs FastAPI and uvicorn ({e.name} is missing): "
                       "pip install 'perfusion-hub[serve]'  (or: pip install fastapi uvicorn)") from None
    import socket

    from cli.serve import Limits, RenderService, create_app
    from perfusion_hub.bases import resolve_spec

    try:  # bind first, so a taken port is one clear line before the model loads
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise PfxError(f"cannot listen on {host}:{port}: {e.strerror or e}; pass another --port or --host") from None
    value = base_value(obj, base)
    b = open_base(obj, value, device=device, dtype=dtype, tokenizer=tokenizer)
    base_covariance(obj, b)  # computed and stored once now, never inside a request
    limits = Limits(max_count=max_count, max_steps=max_steps, max_batch=max_batch, window_s=batch_window_ms / 1000,
                    max_queue=max(max_queue, max_count),
                    default_steps=steps or (25 if resolve_spec(value).kind == "embedded" else 50))
    source = RegistrySource(obj.home_path, obj.offline, b, install_missing=install_missing)
    service = RenderService(b, source, limits, log=lambda m: click.echo(m, err=True))
    service.start()
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"pfx serve: http://{shown}:{bound}/  (base {b.name} on {b.device}; batches of up to {max_batch} "
               f"images; Ctrl-C stops)", err=True)
    if host not in LOOPBACK:
        click.echo(f"note: listening on {host}: anyone who can reach this address can render with your concepts",
                   err=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
        sock.close()
