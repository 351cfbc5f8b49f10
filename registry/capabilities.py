"""What a remote store can do for safe publishing, found by probing it, and what pfx does about it.

Publishing needs two conditional writes (registry/DESIGN.md): a create that fails if the key exists
(`PUT If-None-Match: *`, for claims) and a compare-and-swap (`PUT If-Match: <ETag>`, for index
documents). Stores differ: AWS and moto honour both with the ETag as returned (quoted); Ceph RGW 16
honours both but matches only the *unquoted* ETag in If-Match (the quoted one always answers 412);
s3rver and some proxies ignore both and overwrite. So `pfx remote add` (or the first write to a remote
never probed) runs `probe()` on throwaway keys under `probe/` and records, per capability:

    create     honoured | ignored | unsupported       a second If-None-Match: * create must be refused
    swap       honoured | ignored | refused | unsupported
                                                      a swap with the fresh ETag must succeed (in some
                                                      spelling), one with the now-stale ETag must fail
    etag_form  quoted | unquoted | opaque | None      the If-Match spelling that worked (None: no swap)
    server     the store's Server header, if it sends one

"refused" = the store answered 412 to a swap even with the current ETag in every spelling;
"unsupported" = it answered 501 Not Implemented. A probe that could not finish (endpoint down, 5xx
after retries, bad credentials, no bucket) sets `error` and is never recorded: it says nothing about
the store, so the next write probes again.

`prepare_writes()` applies the recorded result before publish, yank, tag and compact: the ETag
spelling always; where the store lacks a feature, the write is refused (CapabilityRefused, exit 10)
unless the remote was added with --single-writer, where that header is not sent (the remote checks,
then writes) and every such write carries a warning. A conditional write is never weakened into an
unconditional one anywhere else.
"""

from __future__ import annotations

import secrets
import shlex
from datetime import UTC, datetime
from typing import Any

from registry.errors import CapabilityRefused, PfxError, RemoteError
from registry.remotes.base import CasFailed, Remote

CAPS_KEY = "remote-caps:{url}"
PROBE_VERSION = 2
FEATURES = {"create": "If-None-Match: * (create if absent)", "swap": "If-Match (compare-and-swap)"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _not_implemented(e: BaseException) -> bool:
    resp = getattr(e, "response", None) or {}
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status == 501 or resp.get("Error", {}).get("Code") == "NotImplemented"


def _error_text(e: BaseException) -> str:
    if isinstance(e, PfxError):
        return str(e).splitlines()[0]
    resp = getattr(e, "response", None) or {}
    if resp:
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        err = resp.get("Error", {})
        return f"HTTP {status} {err.get('Code') or ''} {err.get('Message') or ''}".strip()
    return f"{type(e).__name__}: {e}"


def _probe_create(remote: Remote, key: str, written: list[str]) -> str:
    try:
        # False with our own bytes there: the create landed and its answer was lost (then retried)
        if not remote.put_if_absent(key, b"probe-1") and remote.get(key, max_bytes=64) != b"probe-1":
            raise RemoteError(f"probe key {key} already existed on {remote.describe()}")
        written.append(key)
        return "ignored" if remote.put_if_absent(key, b"probe-2") else "honoured"
    except Exception as e:
        if _not_implemented(e):
            return "unsupported"
        raise


def _probe_swap(remote: Remote, key: str, create: str, written: list[str]) -> tuple[str, str | None]:
    remote.conditional_create = create != "unsupported"
    first = remote.put_doc(key, b'{"n":1}', etag=None)
    written.append(key)
    remote.conditional_create = True
    accepted = None
    for form in remote.etag_forms:  # the swap with the fresh ETag must succeed in some spelling
        remote.etag_form = form
        try:
            remote.put_doc(key, b'{"n":2}', etag=first)
            accepted = form
            break
        except CasFailed:
            doc = remote.get_doc(key, max_bytes=64)
            if doc is not None and doc.data == b'{"n":2}':  # it landed; a lost answer was retried
                accepted = form
                break
        except Exception as e:
            if _not_implemented(e):
                return "unsupported", None
            raise
    if accepted is None:
        return "refused", None
    try:  # ... and the same ETag, now stale, must be refused in that spelling
        remote.put_doc(key, b'{"n":3}', etag=first)
        stale_won = True
    except CasFailed:
        stale_won = False
    doc = remote.get_doc(key, max_bytes=64)
    if stale_won or doc is None or doc.data != b'{"n":2}':
        return "ignored", None
    return "honoured", accepted


def probe(remote: Remote) -> dict:
    """Probe the store's conditional writes on throwaway keys (deleted afterwards); see the module doc.
    Never raises for the store's sake: a probe that could not finish has `error` set."""
    tok = secrets.token_hex(8)
    k1, k2 = f"probe/{tok}-create", f"probe/{tok}-cas.json"
    out: dict[str, Any] = {"probe_version": PROBE_VERSION, "create": None, "swap": None, "etag_form": None,
                           "server": None, "error": None, "probed_at": _now()}
    saved = (remote.etag_form, remote.conditional_create, remote.conditional_swap)
    remote.conditional_create = remote.conditional_swap = True  # the probe always sends the headers
    written: list[str] = []
    try:
        out["create"] = _probe_create(remote, k1, written)
        out["swap"], out["etag_form"] = _probe_swap(remote, k2, out["create"], written)
    except Exception as e:  # noqa: BLE001 - unreachable, 5xx after retries, denied, no bucket...
        out["error"] = _error_text(e)
    finally:
        remote.etag_form, remote.conditional_create, remote.conditional_swap = saved
        for k in written:  # only what was written: an unreachable store costs no extra timeouts
            try:
                remote.delete(k)
            except Exception:  # noqa: BLE001, S110 - best effort cleanup
                pass
        out["server"] = remote.server()
    if out["error"] is not None:
        out["create"] = out["swap"] = out["etag_form"] = None
    out["conditional_create"] = out["create"] == "honoured"
    out["compare_and_swap"] = out["swap"] == "honoured"
    out["ok"] = out["error"] is None and out["conditional_create"] and out["compare_and_swap"]
    return out


def lacking(result: dict) -> list[str]:
    """The features a complete probe found missing, in words ("If-Match (compare-and-swap)", ...)."""
    return [text for cap, text in FEATURES.items() if result.get(cap) != "honoured"]


def describe(result: dict) -> list[str]:
    """One line per capability, in words a user can act on (the output of `pfx remote add/probe`)."""
    if result.get("error"):
        return [f"could not probe: {result['error']}",
                "nothing was recorded: pfx probes again before the next publish"]
    create = {
        "honoured": "honoured (a second create of the same key was refused)",
        "ignored": "IGNORED (a second create of the same key overwrote the first)",
        "unsupported": "NOT SUPPORTED (the store answered 501 Not Implemented)",
    }[result["create"]]
    swap = {
        "honoured": "honoured (a swap with the current ETag succeeded, one with a stale ETag was refused)",
        "ignored": "IGNORED (a swap with a stale ETag overwrote the document)",
        "refused": "UNUSABLE (the store refused a swap even with the current ETag, in every spelling)",
        "unsupported": "NOT SUPPORTED (the store answered 501 Not Implemented)",
    }[result["swap"]]
    form = {
        "quoted": 'quoted, as the store returns it (If-Match: "<md5>")',
        "unquoted": "unquoted (If-Match: <md5>): this store does not match the quoted form",
        "opaque": "opaque (file:// generation numbers)",
        None: "none (no working compare-and-swap)",
    }[result.get("etag_form")]
    lines = []
    if result.get("server"):
        lines.append(f"store: {result['server']}")
    lines += [f"create if absent (If-None-Match: *): {create}",
              f"compare-and-swap (If-Match):          {swap}",
              f"ETag form in If-Match:                {form}"]
    return lines


def record_probe(home: Any, remote: Remote, result: dict) -> None:
    """Keep a *complete* probe result in the home under the remote's name (dropped by `pfx remote
    remove`). A probe that could not finish is never kept: it says nothing about the store."""
    if result.get("error") is None:
        home.kv_set(CAPS_KEY.format(url=remote.url), result, None, remote=remote.name)


def recorded_probe(home: Any, remote_or_row: Any) -> dict | None:
    """The recorded result, or None when there is none to trust: never probed, a failed probe that an
    older pfx saved, or a result from an older probe that did not test the ETag spelling."""
    url = remote_or_row["url"] if isinstance(remote_or_row, dict) else remote_or_row.url
    name = remote_or_row["name"] if isinstance(remote_or_row, dict) else remote_or_row.name
    got = home.kv_get(CAPS_KEY.format(url=url), remote=name)
    value = got["value"] if got and isinstance(got.get("value"), dict) else None
    if value is None or value.get("probe_version") != PROBE_VERSION or value.get("error") is not None:
        return None
    return value


def apply(remote: Remote, result: dict) -> None:
    """Set how `remote` sends conditional writes from a complete probe result."""
    if result.get("swap") == "honoured" and result.get("etag_form") in remote.etag_forms:
        remote.etag_form = result["etag_form"]
    if remote.single_writer:  # only here may a header the store ignores be left out
        remote.conditional_create = result.get("create") == "honoured"
        remote.conditional_swap = result.get("swap") == "honoured"


def mode(row: dict, result: dict | None) -> str:
    """How pfx writes to the remote, for `pfx remote list`."""
    if row.get("read_only"):
        return "read-only"
    if result is None:
        return "not probed"
    if result["ok"]:
        return "publish"
    if row.get("single_writer"):
        return "single-writer"
    return "refused (no " + ", no ".join(f.split(" (")[0] for f in lacking(result)) + ")"


def single_writer_command(row: dict) -> str:
    """The commands that re-add `row` in single-writer mode, keeping its endpoint, profile and default."""
    name, url = row["name"], row["url"]
    add = ["pfx", "remote", "add", name, url]
    if row.get("endpoint_url"):
        add += ["--endpoint-url", row["endpoint_url"]]
    if row.get("profile"):
        add += ["--profile", row["profile"]]
    if row.get("default"):
        add.append("--default")
    add.append("--single-writer")
    return f"pfx remote remove {shlex.quote(name)} && {shlex.join(add)}"


def _row(home: Any, remote: Remote) -> dict:
    try:
        row = home.get_remote(remote.name)
    except PfxError:
        row = None
    if row is None or row.get("url") != remote.url:
        row = {"name": remote.name, "url": remote.url}
    return row


def prepare_writes(home: Any, remote: Remote, action: str = "publish") -> list[str]:
    """Make `remote` ready for writes (publish, yank, tag, compact) and return the warnings to show.

    Uses the recorded probe, or probes now (and records a complete result). Raises RemoteError (exit 6)
    if the store cannot be probed, CapabilityRefused (exit 10) if it lacks a feature and the remote is
    not in single-writer mode."""
    result = recorded_probe(home, remote)
    if result is None:
        result = probe(remote)
        if result["error"] is not None:
            raise RemoteError(
                f"could not probe {remote.describe()} before {action}: {result['error']}",
                hint="nothing was written or recorded; check the endpoint, the credentials and the bucket "
                     "(pfx probes again next time)")
        record_probe(home, remote, result)
    apply(remote, result)
    if result["ok"]:
        return []
    missing = " and ".join(lacking(result))
    if not remote.single_writer:
        raise CapabilityRefused(
            f"remote '{remote.name}' does not honour {missing}: concurrent publishers there could overwrite "
            f"each other's versions, so pfx will not {action} there",
            hint=f"if you are its only publisher, re-add it in single-writer mode: "
                 f"{single_writer_command(_row(home, remote))} (if the store was upgraded: "
                 f"pfx remote probe {shlex.quote(remote.name)})")
    warning = (f"remote '{remote.name}' does not honour {missing}; {action} in single-writer mode: pfx checks "
               "before it writes, which is safe only while nobody else writes to this remote")
    return [warning]
