"""registry: the package manager side of pfx, without torch.

    from registry import Home, install, publish, search_remote, open_remote

    home = Home.open()                       # PFX_HOME, else the platform's per-user data folder
    install(home, ["cat-mittens@^0.1"])      # resolve, fetch, verify every byte, record
    publish(home, "cat-mittens", to="team")  # immutable blobs, a claim per version, index CAS
    search_remote(open_remote("s3://bucket/pfx"), "cat")

The modules, one job each: names/versions (references and semver), manifest (canonical JSON),
documents (remote index documents, claims, search shards), store/index/home (the local side), remotes
(file://, s3://), resolve/install, publish/compact, search, signing, bundle, lockfile, local_ops. Layout
and protocol: registry/DESIGN.md. Names are imported on first use, so `import registry` stays cheap.
"""

_PUBLIC = {
    "Home": "registry.home",
    "install": "registry.install",
    "publish": "registry.publish",
    "yank": "registry.publish",
    "tag": "registry.publish",
    "compact": "registry.compact",
    "search_remote": "registry.search",
    "resolve_on": "registry.resolve",
    "open_remote": "registry.remotes",
    "parse_ref": "registry.names",
    "validate_name": "registry.names",
    "verify": "registry.local_ops",
    "gc": "registry.local_ops",
    "export_bundle": "registry.bundle",
    "import_bundle": "registry.bundle",
    "write_lock": "registry.lockfile",
    "PfxError": "registry.errors",
}
__all__ = [
    "Home",
    "PfxError",
    "compact",
    "export_bundle",
    "gc",
    "import_bundle",
    "install",
    "open_remote",
    "parse_ref",
    "publish",
    "resolve_on",
    "search_remote",
    "tag",
    "validate_name",
    "verify",
    "write_lock",
    "yank",
]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
