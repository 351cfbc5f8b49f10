"""`pfx card`: show or edit a concept's card (title, trigger phrase, licence, permissions...).

The card options are defined once here (`card_options`) and reused by `pfx train`; the search filters
once too (`filter_options`, used by `pfx search`). Editing a card writes a new version (next patch):
published and stored versions never change.
"""

from __future__ import annotations

import functools

import click

from cli.output import emit, json_option

CARD_PARAMS = ("title", "description", "trigger_phrase", "usage_hint", "author", "tags", "license_",
               "allow_commercial", "allow_derivatives", "require_credit", "thumbnail")

_CARD_OPTIONS = [
    click.option("--title", help="Card title (ModelSpec modelspec.title; default: the name)."),
    click.option("--description", help="What the concept is; markdown is fine."),
    click.option("--trigger-phrase", help="What to write in a prompt (default: the name)."),
    click.option("--usage-hint", help="One line on how to use it (default: trigger, superclass, beta/tau)."),
    click.option("--author", help="Who made it (a name, handle or URL)."),
    click.option("--tags", help="Comma-separated tags (a-z, 0-9, '-'), e.g. cat,pet,orange. '' clears them."),
    click.option("--license", "license_", help="SPDX licence id or expression, e.g. MIT, CC-BY-4.0."),
    click.option("--allow-commercial/--no-allow-commercial", default=None,
                 help="May images made with it be used commercially (Civitai's flag). Unset: not stated."),
    click.option("--allow-derivatives/--no-allow-derivatives", default=None,
                 help="May others share derivatives (merges, fine-tunes) of it. Unset: not stated."),
    click.option("--require-credit/--no-require-credit", default=None,
                 help="Must users credit the author when sharing. Unset: not stated."),
    click.option("--thumbnail", type=click.Path(exists=True, dir_okay=False),
                 help="Image to embed as the small modelspec.thumbnail (re-encoded to <=128 px JPEG)."),
]


def card_edits(values: dict) -> dict:
    """CLI values -> perfusion_hub.card.apply_card edits (None = unchanged)."""
    from perfusion_hub.card import CardError, apply_card, thumbnail_data_uri

    out = {k: values.get(k) for k in ("title", "description", "trigger_phrase", "usage_hint", "author")}
    if values.get("tags") is not None:
        out["tags"] = [t for t in values["tags"].split(",") if t.strip()]
    if values.get("license_") is not None:
        out["license"] = values["license_"]
    perms = {k: values.get(k) for k in ("allow_commercial", "allow_derivatives", "require_credit")}
    if any(v is not None for v in perms.values()):
        out["permissions"] = {k: v for k, v in perms.items() if v is not None}
    if values.get("thumbnail"):
        try:
            out["thumbnail"] = thumbnail_data_uri(values["thumbnail"])
        except (OSError, CardError) as e:
            raise click.BadParameter(f"cannot make a thumbnail of {values['thumbnail']}: {e}",
                                     param_hint="--thumbnail") from None
    out = {k: v for k, v in out.items() if v is not None}
    try:  # checked now, so that `pfx train` refuses a bad value before training, not after
        apply_card({"name": "x"}, out)
    except CardError as e:
        raise click.BadParameter(str(e).removeprefix("card: ")) from None
    return out


def card_options(f):
    """Add the card options to a command; the function gets them as one `card_edits` dict."""
    @functools.wraps(f)
    def wrapper(*args, **kw):
        values = {k: kw.pop(k, None) for k in CARD_PARAMS}
        return f(*args, card_edits=card_edits(values), **kw)

    for opt in reversed(_CARD_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper


FILTER_PARAMS = ("superclass", "base_family", "license_filter", "allow_commercial", "allow_derivatives",
                 "require_credit", "signed")

_FILTER_OPTIONS = [
    click.option("--superclass", help="Only concepts of this superclass (cat, chair...)."),
    click.option("--base-family", help="Only concepts for this base family: sd1, sd2-512, sd2-768-v, sdxl."),
    click.option("--license", "license_filter", metavar="SPDX", help="Only this licence (case-insensitive)."),
    click.option("--allow-commercial/--no-allow-commercial", default=None,
                 help="Only concepts whose card states commercial use of images is (not) allowed."),
    click.option("--allow-derivatives/--no-allow-derivatives", default=None,
                 help="Only concepts whose card states derivatives are (not) allowed."),
    click.option("--require-credit/--no-require-credit", default=None,
                 help="Only concepts whose card states credit is (not) required."),
    click.option("--signed/--unsigned", default=None,
                 help="Only versions with (without) a publisher signature."),
]


def filter_options(f):
    """Add the search filters; the function gets them as one `filters` dict (registry.cards.FILTER_KEYS)."""
    @functools.wraps(f)
    def wrapper(*args, **kw):
        values = {k: kw.pop(k, None) for k in FILTER_PARAMS}
        values["license"] = values.pop("license_filter")
        return f(*args, filters=values, **kw)

    for opt in reversed(_FILTER_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper


def describe_card(card: dict) -> list[str]:
    """Human lines for a card (used by `pfx card` and `pfx info`)."""
    perms = card.get("permissions", {})

    def flag(k, yes, no):
        return yes if perms.get(k) is True else no if perms.get(k) is False else "not stated"

    lines = [
        f"  {'title':<15}{card['title']}",
        f"  {'trigger':<15}{card['trigger_phrase']}",
        f"  {'usage':<15}{card['usage_hint']}",
    ]
    if card.get("author"):
        lines.append(f"  {'author':<15}{card['author']}")
    if card.get("tags"):
        lines.append(f"  {'tags':<15}{', '.join(card['tags'])}")
    lines += [
        f"  {'licence':<15}{card.get('license') or 'not stated'}",
        f"  {'commercial use':<15}{flag('allow_commercial', 'allowed (images)', 'not allowed')}",
        f"  {'derivatives':<15}{flag('allow_derivatives', 'allowed', 'not allowed')}",
        f"  {'credit':<15}{flag('require_credit', 'required', 'not required')}",
        f"  {'base family':<15}{card['base_family']} ({card['architecture']})",
    ]
    if card.get("tensors_sha256"):
        lines.append(f"  {'tensor hash':<15}{card['tensors_sha256'][:18]}... (modelspec.hash_sha256)")
    if card.get("thumbnail"):
        lines.append(f"  {'thumbnail':<15}{len(card['thumbnail']):,} characters (data URI)")
    if card.get("edited_from"):
        lines.append(f"  {'edited from':<15}{card['edited_from'][:19]}...")
    return lines


@click.command("card")
@click.argument("ref", metavar="NAME[@VERSION]")
@card_options
@click.option("--version", "version_", help="Version for the edited card (default: the next patch).")
@json_option
@click.pass_context
def card_cmd(ctx, ref, card_edits, version_, as_json):
    """Show a concept's card, or edit it: any option writes NAME@<next patch> with the same tensors and
    the new card (stored versions, and published ones, never change; `pfx publish` the new one)."""
    from registry.cards import card_view, edit_card

    home = ctx.obj.home
    if not card_edits:
        if version_:
            raise click.UsageError("--version only applies when editing (give a card option)")
        row = home.find_installed(ref)
        if row is None:
            from registry.errors import NotFound

            raise NotFound(f"{ref} is not installed", hint=f"`pfx install {ref}`, or `pfx info {ref}` for a remote's")
        m = home.manifest(row["manifest"])
        data = {"name": m.name, "version": m.version, "manifest": m.digest, "card": card_view(home, m)}
        emit(data, as_json, lambda d: click.echo("\n".join([f"{d['name']}@{d['version']}"] + describe_card(d["card"]))))
        return
    res = edit_card(home, ref, card_edits, version=version_)
    def human(d):
        head = (f"wrote {d['name']}@{d['version']} (card edited from {d['edited_from']}; publish it with "
                f"`pfx publish {d['name']}@{d['version']}`)")
        click.echo("\n".join([head, *describe_card(d["card"])]))

    emit(res, as_json, human)


def register(cli: click.Group) -> None:
    cli.add_command(card_cmd)
