"""The glue between the engine (perfusion_hub) and the store (registry) that the commands share: which base
to use, the base digest cache, the covariance companion (looked up in the store by (base digest, corpus
digest), computed and stored once when missing), and installed concepts loaded and checked against a base.

Click-free, so benchmarks and build scripts call the same code the commands run. torch/diffusers are
imported inside the functions that load a model.
"""

from __future__ import annotations

import os

import click

from cli.output import progress
from registry.errors import NotFound, OfflineError

EMBEDDED_NOTICE = (
    "note: using the embedded '{name}' base (a 64x64 model of a toy world: it shows the workflow, not real photos); "
    "for real images pass --base stable-diffusion-v1-5/stable-diffusion-v1-5 or set PFX_BASE"
)


def base_value(ctx_obj, explicit: str | None) -> str:
    """--base, then PFX_BASE, then config.toml's default_base, then the embedded base (with a notice).

    A name registered with `pfx base add` stands for its location."""
    value = explicit or os.environ.get("PFX_BASE") or ctx_obj.home.config.get("default_base")
    aliases = ctx_obj.home.config.get("bases", {})
    if value in aliases:
        value = aliases[value]["location"]
    if not value:
        from perfusion_hub.bases import DEFAULT_BASE

        click.echo(EMBEDDED_NOTICE.format(name=DEFAULT_BASE), err=True)
        value = DEFAULT_BASE
    return value


def open_base(ctx_obj, value: str, *, device=None, dtype=None, tokenizer=None, tokenizer_2=None):
    """Load the base; its digest comes from the home's cache when the files are unchanged."""
    from perfusion_hub.bases import cache_key, load_base, resolve_spec

    spec = resolve_spec(value)
    key = cache_key(spec)
    cached = ctx_obj.home.get_base_digest(key) if spec.kind != "hub" else None
    base = load_base(value, device=device, dtype=dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                     offline=ctx_obj.offline, digest=cached)
    if not cached:
        ctx_obj.home.set_base_digest(key, base.name, base.digest)
    base.compatible = {d for spec in ctx_obj.home.config.get("bases", {}).values()
                       if spec.get("location") == base.spec.location for d in spec.get("compatible", [])}
    return base


def base_covariance(ctx_obj, base, captions: str | None = None, *, required_corpus: str | None = None):
    """C for (base, corpus): from the store, else estimated once (progress bar) and stored."""
    from perfusion_hub.captions import corpus_digest, load_captions
    from perfusion_hub.covariance import Covariance, estimate_for, packaged_covariance

    home = ctx_obj.home
    lines = load_captions(captions)
    corpus = corpus_digest(lines)
    if required_corpus and required_corpus != corpus:
        found = home.find_covariance(base.digest, required_corpus)
        if not found:
            raise NotFound(
                f"no covariance for this base and the caption corpus {required_corpus[:19]} the concept was "
                "trained with", hint="install the concept from its registry (it ships the covariance)")
        return Covariance.from_bytes(home.store.read_bytes(found), found)
    found = home.find_covariance(base.digest, corpus)
    if found:
        return Covariance.from_bytes(home.store.read_bytes(found), found)
    cov = packaged_covariance(base) if captions is None else None
    if cov is not None:
        digest, _ = home.store.put_bytes(cov.to_bytes())
        home.add_covariance(digest, base_digest=base.digest, corpus_digest=corpus)
        return cov
    with progress(len(lines), "covariance") as bar:
        last = [0]

        def step(done, total):
            bar.update(done - last[0])
            last[0] = done

        cov = estimate_for(base.pipe, lines, base_digest=base.digest, corpus_digest=corpus, progress=step)
    digest, _ = home.store.put_bytes(cov.to_bytes())
    home.add_covariance(digest, base_digest=base.digest, corpus_digest=corpus)
    return cov


def installed_concepts(ctx_obj, names: list[str], *, install_missing: bool):
    """Concept objects for installed names (installing missing ones first with --install)."""
    from registry.names import parse_ref

    home = ctx_obj.home
    rows, missing = {}, []
    for n in names:
        row = home.find_installed(parse_ref(n))
        if row is None:
            missing.append(n)
        else:
            rows[n] = row
    if missing and install_missing:
        if ctx_obj.offline:
            raise OfflineError(f"not installed: {', '.join(missing)}; pfx is offline, so nothing can be fetched")
        from registry.install import install

        install(home, missing)
        for n in missing:
            rows[n] = home.find_installed(parse_ref(n))
    elif missing:
        raise NotFound(f"not installed: {', '.join(missing)}",
                       hint=f"run `pfx install {' '.join(missing)}` or add --install")
    return [(rows[n], home.manifest(rows[n]["manifest"])) for n in names]


def concepts_for(ctx_obj, base, pairs):
    """Load concept files from the store, check them against the base, and find the covariance."""
    from perfusion_hub.concept import check_fits_base, load_concept
    from perfusion_hub.covariance import Covariance

    home = ctx_obj.home
    concepts = []
    for row, manifest in pairs:
        c = load_concept(home.store.read_bytes(manifest.concept["digest"]))
        check_fits_base(c, base_name=base.name, base_digest=base.digest, dim=base.dim, layers=base.layers(),
                        compatible=base.compatible, family=base.family, text_dims=base.text_dims)
        concepts.append(c)
    if not concepts:
        return [], None
    covs = {m.covariance["digest"] for _, m in pairs if getattr(m, "covariance", None)}
    if len(covs) == 1 and home.store.has(next(iter(covs))):
        d = next(iter(covs))
        return concepts, Covariance.from_bytes(home.store.read_bytes(d), d)
    return concepts, base_covariance(ctx_obj, base, required_corpus=concepts[0].metadata["corpus_digest"])
