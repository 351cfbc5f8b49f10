"""Publisher signatures (ed25519) over manifest digests, and the per-namespace trust policy.

Why detached signatures: the manifest digest is a version's identity, so a signature *inside* the
manifest would change the thing it signs. A signature is a separate, immutable, content-checked
object beside the manifest in the remote:

    sigs/sha256/<ab>/<manifest hex>/<keyid>.sig
    {"algorithm":"ed25519","keyid":"<32 hex>","schema":"pfx.sig/1","signature":"<base64, 64 bytes>",
     "signed":"sha256:<manifest hex>"}

The signed message is `pfx.sig/1\\n<manifest digest>\\n` (a fixed prefix, so a pfx signature can never be
replayed as a signature over anything else). ed25519 is deterministic: re-publishing with the same
key writes the same bytes, so the object can be created with If-None-Match like every immutable one.

The client knows which key ids it trusts, so it GETs each signature by its key: an install costs one
extra request per trusted key of the namespace (normally one), never a LIST.

Keys live in the home: private keys in `<home>/keys/<name>.key` (PKCS#8 PEM, mode 0600, in a 0700
folder; refused if others can read them), their public halves in `<name>.pub`. Trusted public keys and
policies are in config.toml (`[[trusted_keys]]`, `[trust_policy]`), which a user can read and review.

Policy per namespace (`team/cat` -> "team"; un-namespaced names -> ""):
  * an explicit `[trust_policy]` entry wins (off | warn | enforce);
  * otherwise `enforce` as soon as any key is trusted for the namespace;
  * otherwise the `"*"` entry if there is one, else `off`.
Under `enforce` a version without a valid signature by a trusted key is refused (Untrusted, exit 9)
before any blob is fetched; under `warn` it installs with a one-line warning; `off` fetches nothing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import Conflict, IntegrityError, NotFound, Untrusted, UsageError
from registry.manifest import Manifest, canonical_json, strict_json
from registry.names import is_digest, validate_name
from registry.remotes.base import KeyMissing

ALGORITHM = "ed25519"
SIG_SCHEMA = "pfx.sig/1"
MAX_SIG_BYTES = 4 << 10
PUBKEY_PREFIX = "pfx-ed25519:"
POLICIES = ("off", "warn", "enforce")
ANY_NAMESPACE = "*"
DEFAULT_NAMESPACE = ""
_KEY_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)
_KEYID = re.compile(r"[0-9a-f]{32}", re.ASCII)


# --------------------------------------------------------------------------------------------------
# Layout and messages


def sig_key(manifest_digest: str, keyid: str) -> str:
    """Remote key of a signature: beside the manifest, addressed by digest and key id only."""
    if not is_digest(manifest_digest) or not _KEYID.fullmatch(keyid or ""):
        raise IntegrityError(f"bad signature address ({manifest_digest!r}, {keyid!r})")
    h = manifest_digest[7:]
    return f"sigs/sha256/{h[:2]}/{h}/{keyid}.sig"


def _message(manifest_digest: str) -> bytes:
    return f"{SIG_SCHEMA}\n{manifest_digest}\n".encode("ascii")


def namespace_of(name: str) -> str:
    """'team/cat' -> 'team'; 'cat' -> '' (the default namespace)."""
    return name.split("/", 1)[0] if "/" in name else DEFAULT_NAMESPACE


def normalize_namespace(text: str) -> str:
    """CLI spelling -> stored form: '' or 'default' mean the un-namespaced names, '*' every namespace
    without its own entry; anything else must be a valid name part. (A namespace literally called
    'default' is written 'default/'.)"""
    text = (text or "").strip()
    if text in ("", "default", "/"):
        return DEFAULT_NAMESPACE
    if text == ANY_NAMESPACE:
        return ANY_NAMESPACE
    ns = text.removesuffix("/")
    if "/" in ns:
        raise UsageError(f"invalid namespace {text!r}: a namespace is the part before '/' in 'team/cat'")
    validate_name(ns)
    return ns


def ns_label(ns: str) -> str:
    return "default (un-namespaced)" if ns == DEFAULT_NAMESPACE else ns


# --------------------------------------------------------------------------------------------------
# Public keys


def keyid_of(raw_public: bytes) -> str:
    """First 16 bytes of sha256(raw public key), hex: short enough for a file name, long enough that
    nobody can make a second key with the same id."""
    return hashlib.sha256(raw_public).hexdigest()[:32]


def _raw_public(pub) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key_text(pub) -> str:
    return PUBKEY_PREFIX + base64.b64encode(_raw_public(pub)).decode("ascii")


def parse_public_key(text: str):
    """'pfx-ed25519:<base64 of 32 bytes>' -> (Ed25519PublicKey, keyid). UsageError says why not."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = (text or "").strip()
    if not text.startswith(PUBKEY_PREFIX):
        raise UsageError(f"not a pfx public key: {text[:40]!r}",
                         hint=f"public keys look like '{PUBKEY_PREFIX}<base64>' (see `pfx key export`)")
    try:
        raw = base64.b64decode(text[len(PUBKEY_PREFIX):], validate=True)
    except ValueError:
        raise UsageError("public key: invalid base64") from None
    if len(raw) != 32:
        raise UsageError(f"public key: {len(raw)} bytes, an ed25519 key has 32")
    return Ed25519PublicKey.from_public_bytes(raw), keyid_of(raw)


def read_public_key_arg(arg: str) -> str:
    """The CLI takes a key or a file holding one (first non-comment line)."""
    if arg.startswith(PUBKEY_PREFIX):
        return arg
    p = Path(arg).expanduser()
    if p.is_file():
        if p.stat().st_size > 4096:
            raise UsageError(f"{p}: too large for a public key file")
        for line in p.read_text("utf-8", errors="replace").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return line.strip()
        raise UsageError(f"{p}: no key in the file")
    raise UsageError(f"{arg!r} is neither a public key nor a readable file",
                     hint=f"pass '{PUBKEY_PREFIX}...' (from `pfx key export`) or a .pub file")


# --------------------------------------------------------------------------------------------------
# Own keys in <home>/keys


def keys_dir(home: Any) -> Path:
    d = Path(home.root) / "keys"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _check_key_name(name: str) -> str:
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise UsageError(f"invalid key name {name!r}", hint="lowercase letters, digits, '-' or '_' (max 32)")
    return name


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Create-only write (never overwrite a key), fsynced; the mode is set at creation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_key(home: Any, name: str = "default") -> dict:
    """Make an ed25519 key pair `name`. The first key becomes the default signing key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    _check_key_name(name)
    d = keys_dir(home)
    priv_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    if priv_path.exists():
        raise Conflict(f"a key named {name!r} already exists ({priv_path})", hint="pick another NAME")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        _write_exclusive(priv_path, pem, 0o600)
    except FileExistsError:
        raise Conflict(f"a key named {name!r} already exists ({priv_path})") from None
    pub_text = public_key_text(key.public_key())
    tmp = pub_path.with_suffix(".pub.tmp")
    tmp.write_text(pub_text + "\n", "utf-8")
    os.replace(tmp, pub_path)
    with home.edit_config() as cfg:
        if not cfg.get("signing_key"):
            cfg["signing_key"] = name
    return {"name": name, "keyid": keyid_of(_raw_public(key.public_key())), "public": pub_text,
            "default": home.config.get("signing_key") == name, "path": str(priv_path)}


def own_keys(home: Any) -> list[dict]:
    """Key pairs in <home>/keys, with the default marked."""
    default = home.config.get("signing_key")
    d = Path(home.root) / "keys"
    out = []
    for p in sorted(d.glob("*.pub")) if d.is_dir() else []:
        name = p.stem
        if not _KEY_NAME.fullmatch(name) or not (d / f"{name}.key").exists():
            continue
        text = p.read_text("utf-8").strip()
        try:
            _, kid = parse_public_key(text)
        except UsageError:
            continue
        out.append({"name": name, "keyid": kid, "public": text, "default": name == default})
    return out


def load_private_key(home: Any, name: str):
    """The private key `name`; refused if the file is readable by others (like ssh does)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    _check_key_name(name)
    path = Path(home.root) / "keys" / f"{name}.key"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotFound(f"no signing key named {name!r}", hint="`pfx key generate NAME` or `pfx key list`") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise Untrusted(f"private key {path} is accessible by other users; refusing to use it",
                        hint=f"chmod 600 {path}")
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{path} is not an ed25519 private key")
    return key


def export_public(home: Any, name: str | None = None) -> dict:
    keys = own_keys(home)
    name = name or home.config.get("signing_key")
    for k in keys:
        if k["name"] == name:
            return k
    raise NotFound(f"no key named {name!r}" if name else "no signing key yet",
                   hint="`pfx key generate` makes one")


# --------------------------------------------------------------------------------------------------
# Signing and checking one signature document


@dataclass(frozen=True)
class Signer:
    name: str
    keyid: str
    key: Any  # Ed25519PrivateKey

    def sign(self, manifest_digest: str) -> bytes:
        """The signature document for a manifest digest (deterministic bytes)."""
        if not is_digest(manifest_digest):
            raise IntegrityError(f"not a manifest digest: {manifest_digest!r}")
        sig = self.key.sign(_message(manifest_digest))
        return canonical_json({"schema": SIG_SCHEMA, "algorithm": ALGORITHM, "keyid": self.keyid,
                               "signed": manifest_digest, "signature": base64.b64encode(sig).decode("ascii")})


def choose_signer(home: Any, *, sign: bool | None = None, key: str | None = None) -> Signer | None:
    """publish's rule: --key NAME signs with NAME; --no-sign never signs; otherwise sign with the
    default key when there is one (and say nothing when there is none, unless --sign was given)."""
    if sign is False:
        return None
    name = key or home.config.get("signing_key")
    if not name:
        if sign:
            raise NotFound("--sign: there is no signing key", hint="`pfx key generate` makes one")
        return None
    k = load_private_key(home, name)
    return Signer(name, keyid_of(_raw_public(k.public_key())), k)


def check_signature(data: bytes, *, manifest_digest: str, keyid: str, public_key: Any, where: str) -> None:
    """A signature document must be small, strict JSON, name the key and digest it was fetched for,
    and verify. Anything else is an IntegrityError naming `where`."""
    from cryptography.exceptions import InvalidSignature

    raw = strict_json(data, where, MAX_SIG_BYTES)
    if not isinstance(raw, dict) or set(raw) != {"schema", "algorithm", "keyid", "signed", "signature"}:
        raise IntegrityError(f"{where}: not a signature (fields schema, algorithm, keyid, signed, signature)")
    if raw["schema"] != SIG_SCHEMA or raw["algorithm"] != ALGORITHM:
        raise IntegrityError(f"{where}: schema/algorithm {raw['schema']!r}/{raw['algorithm']!r} not supported")
    if raw["keyid"] != keyid or raw["signed"] != manifest_digest:
        raise IntegrityError(f"{where}: signs {str(raw['signed'])[:80]!r} with key {str(raw['keyid'])[:40]!r}, "
                             "which disagrees with where it was found")
    try:
        sig = base64.b64decode(raw["signature"], validate=True) if isinstance(raw["signature"], str) else b""
    except ValueError:
        sig = b""
    if len(sig) != 64:
        raise IntegrityError(f"{where}: signature is not 64 bytes of base64")
    try:
        public_key.verify(sig, _message(manifest_digest))
    except InvalidSignature:
        raise IntegrityError(f"{where}: signature does not verify (tampered manifest or signature)") from None


# --------------------------------------------------------------------------------------------------
# Trust: config.toml `[trust_policy]` and `[[trusted_keys]]`


@dataclass
class TrustResult:
    status: str  # "off" | "verified" | "warn"
    keyid: str | None = None
    signature: bytes | None = None
    message: str | None = None


@dataclass
class Trust:
    """A snapshot of the trust configuration; safe to use from install's resolver threads (it touches
    neither SQLite nor the config file)."""

    policies: dict[str, str] = field(default_factory=dict)
    keys: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)  # ns -> [(keyid, public key)]

    @classmethod
    def from_config(cls, cfg: dict) -> Trust:
        pol = {str(k): str(v) for k, v in (cfg.get("trust_policy") or {}).items() if v in POLICIES}
        keys: dict[str, list[tuple[str, Any]]] = {}
        for e in cfg.get("trusted_keys") or []:
            try:
                pub, kid = parse_public_key(str(e.get("key", "")))
            except UsageError:
                continue  # a hand-edited broken entry trusts nothing
            keys.setdefault(str(e.get("namespace", "")), []).append((kid, pub))
        return cls(pol, keys)

    @classmethod
    def load(cls, home: Any) -> Trust:
        cfg = getattr(home, "config", None)
        return cls.from_config(cfg if isinstance(cfg, dict) else {})

    def policy(self, ns: str) -> str:
        if ns in self.policies:
            return self.policies[ns]
        if self.keys.get(ns):
            return "enforce"
        return self.policies.get(ANY_NAMESPACE, "off")

    def _fail(self, pol: str, m: Manifest, problems: list[str], ns: str) -> TrustResult:
        why = "; ".join(problems) if problems else f"no key is trusted for namespace {ns_label(ns)}"
        msg = f"{m.ref()} ({m.digest[:19]}...): not signed by a trusted key ({why})"
        if pol == "enforce":
            raise Untrusted(msg, hint=f"trust the publisher's key: pfx key trust {ns or 'default'} KEY, "
                                      f"or relax the policy: pfx key policy {ns or 'default'} warn")
        return TrustResult("warn", message=msg)

    def check_remote(self, remote: Any, m: Manifest) -> TrustResult:
        """Fetch and check this manifest's signatures by the namespace's trusted keys, by key (no LIST).
        Raises Untrusted under enforce; returns a warning under warn."""
        def fetch(key: str) -> bytes | None:
            try:
                return remote.get(key, max_bytes=MAX_SIG_BYTES)
            except KeyMissing:
                return None

        return self.check_with(fetch, m, remote.describe())

    def check_with(self, fetch: Any, m: Manifest, where: str) -> TrustResult:
        """The check itself, over any source: `fetch(key)` returns the object's bytes or None."""
        ns = namespace_of(m.name)
        pol = self.policy(ns)
        if pol == "off":
            return TrustResult("off")
        problems = []
        for kid, pub in self.keys.get(ns, []):
            key = sig_key(m.digest, kid)
            data = fetch(key)
            if data is None:
                problems.append(f"no signature by {kid[:12]}")
                continue
            try:
                check_signature(data, manifest_digest=m.digest, keyid=kid, public_key=pub,
                                where=f"signature {key} on {where}")
            except IntegrityError as e:
                problems.append(str(e).splitlines()[0])
                continue
            return TrustResult("verified", kid, data)
        return self._fail(pol, m, problems, ns)

    def check_stored(self, name: str, digest: str, sigs: list[tuple[str, bytes]]) -> tuple[str, str | None]:
        """Offline check for `pfx verify`: ('ok'|'off'|'warn'|'untrusted', detail)."""
        ns = namespace_of(name)
        pol = self.policy(ns)
        if pol == "off":
            return "off", None
        stored = dict(sigs)
        problems = []
        for kid, pub in self.keys.get(ns, []):
            if kid not in stored:
                problems.append(f"no stored signature by {kid[:12]}")
                continue
            try:
                check_signature(stored[kid], manifest_digest=digest, keyid=kid, public_key=pub,
                                where=f"stored signature of {name} by {kid[:12]}")
                return "ok", None
            except IntegrityError as e:
                problems.append(str(e).splitlines()[0])
        why = "; ".join(problems) if problems else f"no key is trusted for namespace {ns_label(ns)}"
        return ("untrusted" if pol == "enforce" else "warn"), why


def trust_key(home: Any, namespace: str, key_text: str, label: str | None = None) -> dict:
    """Trust `key_text` for `namespace` (which, with no explicit policy, turns on enforce there)."""
    ns = normalize_namespace(namespace)
    if ns == ANY_NAMESPACE:
        raise UsageError("keys are trusted per namespace, not for '*'",
                         hint="trust it for each namespace the publisher owns")
    _, kid = parse_public_key(key_text)
    with home.edit_config() as cfg:
        entries = cfg.setdefault("trusted_keys", [])
        if not any(e.get("namespace") == ns and e.get("keyid") == kid for e in entries):
            entry = {"namespace": ns, "keyid": kid, "key": key_text.strip()}
            if label:
                entry["label"] = label
            entries.append(entry)
    return {"namespace": ns, "keyid": kid, "policy": Trust.load(home).policy(ns)}


def untrust_key(home: Any, namespace: str, keyid_or_key: str) -> dict:
    ns = normalize_namespace(namespace)
    kid = keyid_or_key.strip()
    if kid.startswith(PUBKEY_PREFIX):
        kid = parse_public_key(kid)[1]
    with home.edit_config() as cfg:
        entries = cfg.get("trusted_keys") or []
        keep = [e for e in entries if not (e.get("namespace") == ns and str(e.get("keyid", "")).startswith(kid))]
        if len(keep) == len(entries) or not kid:
            raise NotFound(f"no trusted key {kid!r} for namespace {ns_label(ns)}", hint="`pfx key list`")
        cfg["trusted_keys"] = keep
    return {"namespace": ns, "removed": len(entries) - len(keep), "policy": Trust.load(home).policy(ns)}


def set_policy(home: Any, namespace: str, policy: str) -> dict:
    """Set off|warn|enforce for a namespace ('*' = every namespace without its own); 'auto' removes
    the entry (enforce if a key is trusted there, else the '*' policy)."""
    ns = normalize_namespace(namespace)
    if policy not in POLICIES + ("auto",):
        raise UsageError(f"unknown policy {policy!r}", hint="off, warn, enforce or auto")
    with home.edit_config() as cfg:
        table = cfg.setdefault("trust_policy", {})
        if policy == "auto":
            table.pop(ns, None)
        else:
            table[ns] = policy
        if not table:
            cfg.pop("trust_policy")
    return {"namespace": ns, "policy": Trust.load(home).policy(ns)}


def trust_listing(home: Any) -> dict:
    cfg = home.config
    trust = Trust.from_config(cfg)
    namespaces = sorted(set(trust.policies) | set(trust.keys))
    return {
        "keys": own_keys(home),
        "trusted": [{"namespace": e.get("namespace", ""), "keyid": e.get("keyid"), "key": e.get("key"),
                     "label": e.get("label")} for e in cfg.get("trusted_keys") or []],
        "policies": {ns: trust.policy(ns) for ns in namespaces},
    }


def verify_installed(home: Any) -> dict:
    """`pfx verify`'s trust pass, offline: each installed version from a remote (locally trained ones
    are the user's own) must have a stored signature by a key trusted now for its namespace."""
    trust = Trust.load(home)
    if not trust.policies and not trust.keys:
        return {"untrusted": [], "trust_warnings": []}
    out: dict[str, list] = {"untrusted": [], "trust_warnings": []}
    rows = home.index.conn.execute("SELECT name, version, manifest FROM installed WHERE remote IS NOT NULL").fetchall()
    for name, version, digest in rows:
        status, why = trust.check_stored(name, digest, home.index.signatures(digest))
        if status == "untrusted":
            out["untrusted"].append({"digest": digest, "role": "signature", "used_by": [f"{name}@{version}"],
                                     "detail": why})
        elif status == "warn":
            out["trust_warnings"].append(f"{name}@{version}: {why}")
    return out
