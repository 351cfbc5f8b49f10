"""Remotes: one protocol (`base.Remote`), two stores (file://, s3://), one factory.

`open_remote(row, offline=...)` turns a remote config row from `Home.list_remotes()` into a Remote.
In offline mode an s3:// remote becomes an `OfflineRemote` that refuses every call before any socket
could be opened; file:// remotes stay usable (reading a local folder is not network access, and it
is what makes the bundled sample registry work on a machine with no network).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from registry.errors import OfflineError, UsageError
from registry.remotes.base import Remote


class OfflineRemote(Remote):
    """Stands in for a network remote in offline mode: every operation raises OfflineError."""

    def __init__(self, name: str, url: str):
        self.name, self.url = name, url
        self.read_only = True

    def _refuse(self, *_a, **_k):
        raise OfflineError(
            f"offline: remote '{self.name}' ({self.url}) was not contacted",
            hint="unset PFX_OFFLINE / drop --offline to use the network",
        )

    get = get_doc = open_blob = head_size = put_if_absent = put_doc = list_keys = delete = _refuse  # type: ignore[assignment]


def file_url_path(url: str) -> Path:
    p = urlparse(url)
    if p.scheme != "file" or p.netloc not in ("", "localhost"):
        raise UsageError(f"not a local file:// URL: {url!r}", hint="use file:///absolute/path")
    return Path(unquote(p.path))


def _inside_package(path: Path) -> bool:
    """Registries shipped inside the installed packages (the sample registry) are never written to."""
    import perfusion_hub
    import registry

    try:
        resolved = path.resolve()
    except OSError:
        return False
    for pkg in (registry, perfusion_hub):
        root = Path(pkg.__file__).resolve().parent
        if resolved == root or root in resolved.parents:
            return True
    return False


def open_remote(row: dict, *, offline: bool, **options) -> Remote:
    """A Remote for a config row {'name','url','endpoint_url','profile','single_writer','read_only'}.

    `options` pass through to the implementation (e.g. max_pool / attempts for S3Remote)."""
    name, url = row["name"], row["url"]
    read_only = bool(row.get("read_only"))
    single_writer = bool(row.get("single_writer"))
    if url.startswith("file://"):
        from registry.remotes.file import FileRemote

        path = file_url_path(url)
        return FileRemote(name, path, read_only=read_only or _inside_package(path), single_writer=single_writer)
    if url.startswith("s3://"):
        if offline:
            return OfflineRemote(name, url)
        from registry.remotes.s3 import S3Remote

        return S3Remote(
            name, url, endpoint_url=row.get("endpoint_url"), profile=row.get("profile"),
            read_only=read_only, single_writer=single_writer, **options,
        )
    raise UsageError(f"remote '{name}': unsupported URL {url!r}", hint="use s3://bucket/prefix or file:///path")


__all__ = ["OfflineRemote", "Remote", "file_url_path", "open_remote"]
