"""`pfx key`: publisher keys (ed25519) and the per-namespace trust policy.

Thin wrappers over registry/signing.py; nothing here imports torch or diffusers. Private keys never
leave the home (`<home>/keys`, 0600); `pfx key export` prints only the public half, which publishers
hand to their users for `pfx key trust NAMESPACE KEY`.
"""

from __future__ import annotations

import click

from cli.output import emit, json_option, table


def _home(ctx: click.Context):
    return ctx.obj.home


@click.group()
def key():
    """Signing keys and trust: generate, list, export, trust, untrust, policy."""


@key.command("generate")
@click.argument("name", default="default")
@json_option
@click.pass_context
def key_generate(ctx, name, as_json):
    """Make an ed25519 key pair NAME (the first one becomes the default signing key)."""
    from registry.signing import generate_key

    k = generate_key(_home(ctx), name)
    emit(k, as_json, lambda d: click.echo(
        f"generated key {d['name']} ({d['keyid']}){' (default signing key)' if d['default'] else ''}\n"
        f"public key: {d['public']}\n"
        f"users trust it with: pfx key trust NAMESPACE {d['public']}"))


@key.command("list")
@json_option
@click.pass_context
def key_list(ctx, as_json):
    """Your keys, the keys you trust per namespace, and the effective policies."""
    from registry.signing import ns_label, trust_listing

    data = trust_listing(_home(ctx))

    def human(d):
        click.echo("your keys:" if d["keys"] else "your keys: none (pfx key generate)")
        table([{**k, "default": "*" if k["default"] else ""} for k in d["keys"]],
              [("default", ""), ("name", "NAME"), ("keyid", "KEYID")])
        click.echo("trusted keys:" if d["trusted"] else "trusted keys: none")
        table([{**t, "namespace": ns_label(t["namespace"])} for t in d["trusted"]],
              [("namespace", "NAMESPACE"), ("keyid", "KEYID"), ("label", "LABEL")])
        if d["policies"]:
            click.echo("policies:")
            table([{"namespace": ns_label(ns) if ns != "*" else "* (others)", "policy": p}
                   for ns, p in d["policies"].items()], [("namespace", "NAMESPACE"), ("policy", "POLICY")])

    emit(data, as_json, human)


@key.command("export")
@click.argument("name", required=False)
@json_option
@click.pass_context
def key_export(ctx, name, as_json):
    """Print the public key of NAME (default: the default signing key)."""
    from registry.signing import export_public

    k = export_public(_home(ctx), name)
    emit(k, as_json, lambda d: click.echo(d["public"]))


@key.command("trust")
@click.argument("namespace")
@click.argument("public_key", metavar="PUBKEY_OR_FILE")
@click.option("--label", help="A note for `pfx key list` (e.g. the publisher's name).")
@json_option
@click.pass_context
def key_trust(ctx, namespace, public_key, label, as_json):
    """Trust a publisher key for NAMESPACE ('default' = un-namespaced names). Turns on 'enforce' there
    unless a policy was set explicitly."""
    from registry.signing import ns_label, read_public_key_arg, trust_key

    res = trust_key(_home(ctx), namespace, read_public_key_arg(public_key), label)
    emit(res, as_json, lambda d: click.echo(
        f"trusted {d['keyid']} for {ns_label(d['namespace'])} (policy: {d['policy']})"))


@key.command("untrust")
@click.argument("namespace")
@click.argument("keyid", metavar="KEYID_OR_PUBKEY")
@json_option
@click.pass_context
def key_untrust(ctx, namespace, keyid, as_json):
    """Stop trusting a key (by key id, a prefix of it, or the key) for NAMESPACE."""
    from registry.signing import ns_label, untrust_key

    res = untrust_key(_home(ctx), namespace, keyid)
    emit(res, as_json, lambda d: click.echo(
        f"removed {d['removed']} key(s) for {ns_label(d['namespace'])} (policy now: {d['policy']})"))


@key.command("policy")
@click.argument("namespace")
@click.argument("policy", type=click.Choice(["off", "warn", "enforce", "auto"]))
@json_option
@click.pass_context
def key_policy(ctx, namespace, policy, as_json):
    """Set NAMESPACE's policy ('*' = every namespace without its own; 'auto' = enforce once a key is
    trusted there)."""
    from registry.signing import ns_label, set_policy

    res = set_policy(_home(ctx), namespace, policy)
    emit(res, as_json, lambda d: click.echo(f"policy for {ns_label(d['namespace'])}: {d['policy']}"))


def register(cli: click.Group) -> None:
    cli.add_command(key)
