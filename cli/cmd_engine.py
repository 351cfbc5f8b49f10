"""`pfx train`, `pfx render`, `pfx base ...`: the commands that load a model.

torch/diffusers are imported inside the command bodies only; what the commands share with benchmarks and
build scripts (choosing and opening a base, its covariance, installed concepts) is cli.engine_store.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click

from cli.cmd_card import card_options
from cli.engine_store import base_covariance, base_value, concepts_for, installed_concepts, open_base
from cli.output import emit, json_option, progress, table
from registry.errors import NotFound, UsageError


def _parse_assignments(values: tuple[str, ...], flag: str) -> dict[str, float]:
    out = {}
    for v in values:
        name, sep, num = v.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(num)
        except ValueError:
            raise click.BadParameter(f"expected NAME=NUMBER, got {v!r}", param_hint=flag) from None
    return out


def _parse_sweep(text: str) -> list[float]:
    try:
        lo, hi, n = text.split(":")
        lo, hi, n = float(lo), float(hi), int(n)
        if n < 2 or n > 32:
            raise ValueError
    except ValueError:
        raise click.BadParameter("expected LO:HI:N with 2 <= N <= 32, e.g. 0.5:0.9:5", param_hint="--sweep-beta") from None
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def register(cli: click.Group) -> None:
    cli.add_command(train)
    cli.add_command(render)
    cli.add_command(base_group)


@click.command()
@click.argument("photos", type=click.Path(exists=True, file_okay=False))
@click.option("--name", required=True, help="Concept name, e.g. cat-mittens (or ns/name).")
@click.option("--superclass", required=True, help="One-token word for what it is: cat, dog, chair...")
@click.option("--version", "version_", help="Version to create (default: 0.1.0, or the next minor).")
@click.option("--base", help="Base model (default: PFX_BASE, config, else the embedded base).")
@click.option("--steps", type=click.IntRange(1, 100_000), default=400, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 1024), default=16, show_default=True, help="Effective batch.")
@click.option("--micro-batch", type=click.IntRange(0, 1024), default=0, help="Per forward (0: auto).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-flip", is_flag=True, help="No horizontal flips (asymmetric subjects).")
@click.option("--embedding-norm", type=click.FloatRange(0, 100, max_open=True),
              help="Cap the concept embedding's norm at this multiple of the superclass word's; 0: no cap "
                   "(default: the base's pfx.json, else 0).")
@click.option("--devices", type=click.IntRange(1, 64), default=1, show_default=True, help="GPUs, data-parallel.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of the same run.")
@click.option("--fast", is_flag=True,
              help="Compile the UNet and, on CUDA, replay each step as one CUDA graph (GPU; same math, other rounding).")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), help="Caption file for the covariance.")
@click.option("--device", help="cuda, cuda:1, cpu, mps (untested) or auto.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), help="Tokenizer folder (single-file bases).")
@click.option("--tokenizer-2", "tokenizer_2", type=click.Path(exists=True, file_okay=False),
              help="Second tokenizer folder (single-file SDXL bases).")
@click.option("--previews", type=click.IntRange(0, 16), default=2, show_default=True)
@card_options
@json_option
@click.pass_obj
def train(obj, photos, name, superclass, version_, base, steps, batch_size, micro_batch, seed, no_flip,
          embedding_norm, devices, resume, fast, captions, device, dtype, tokenizer, tokenizer_2, previews,
          card_edits, as_json):
    """Learn a concept from a folder of photos (optional masks/ beside them). The card options (title,
    licence, permissions...) go into the file's header; the thumbnail defaults to the first preview."""
    license_, description = card_edits.get("license", ""), card_edits.get("description", "")
    from registry.names import validate_name
    from registry.versions import parse_version

    home = obj.home
    validate_name(name)
    if version_:
        parse_version(version_)
    version_ = version_ or home.next_version(name)
    if home.find_installed(_exact(name, version_)):
        raise UsageError(f"{name}@{version_} already exists; pass --version with a new version")
    from perfusion_hub.train import TrainConfig, train_concept

    value = base_value(obj, base)
    b = open_base(obj, value, device=device, dtype=dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    cov = base_covariance(obj, b, captions)
    work = home.root / "work"
    work.mkdir(exist_ok=True)
    run_id = f"{name.replace('/', '--')}-{version_}"
    cfg = TrainConfig(steps=steps, batch_size=batch_size, micro_batch=micro_batch, seed=seed, flip=not no_flip,
                      previews=previews, embedding_norm=embedding_norm)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work) as tmp, progress(steps, "train") as bar:
        def on_step(step, total, loss):
            bar.update(1)
            bar.set_postfix(f"loss {loss:.4f}")
            if step % 200 == 0:  # a live run's temp folder stays young, so `pfx gc` leaves it alone
                os.utime(tmp)

        kwargs = {"name": name, "superclass": superclass, "version": version_,
                  "out_path": Path(tmp) / "concept.safetensors", "config": cfg,
                  "checkpoint_path": work / f"{run_id}.ckpt", "resume": resume, "license": license_,
                  "description": description, "fast": fast}
        if devices > 1:
            from perfusion_hub.distributed import train_data_parallel

            click.echo(f"training data-parallel on {devices} {'GPUs' if b.device.startswith('cuda') else 'CPU processes'}"
                       " (no progress bar)", err=True)
            summary = train_data_parallel(
                devices, value, covariance=cov, photos_dir=str(photos),
                load_kwargs={"device": "cuda" if b.device.startswith("cuda") else "cpu", "dtype": dtype,
                             "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "offline": obj.offline,
                             "digest": b.digest}, **kwargs)
            result = SimpleNamespace(path=Path(summary["path"]), previews=[Path(p) for p in summary["previews"]],
                                     losses=summary["losses"], warnings=summary["warnings"])
        else:
            result = train_concept(b, photos, covariance=cov, progress=on_step,
                                   warn=lambda m: click.echo(f"warning: {m}", err=True), **kwargs)
        edits = dict(card_edits)
        if "thumbnail" not in edits and result.previews:
            from perfusion_hub.card import thumbnail_data_uri

            edits["thumbnail"] = thumbnail_data_uri(result.previews[0])
        from perfusion_hub.concept import edit_card

        edit_card(result.path, edits)
        manifest = home.add_concept_file(
            result.path, previews=result.previews, description=description, license=license_,
            covariance={"digest": cov.digest, "size": len(cov.to_bytes()), "base_digest": b.digest,
                        "corpus_digest": cov.corpus_digest},
        )
    info = {
        "name": name, "version": version_, "manifest": manifest.digest, "concept": manifest.concept,
        "base": b.name, "base_digest": b.digest, "family": b.family, "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": round(sum(result.losses[-10:]) / max(1, len(result.losses[-10:])), 5),
        "skipped": result.warnings,
    }
    emit(info, as_json, lambda d: click.echo(
        f"trained {name}@{version_} in {d['seconds']} s ({manifest.concept['size']:,} bytes, "
        f"final loss {d['final_loss']}); render it with: pfx render \"a photo of {name}\""))


def _exact(name, version):
    from registry.names import parse_ref

    return parse_ref(f"{name}@{version}")


def _concept_names(obj, installed: set[str], prompt: str, with_names, install_missing: bool) -> list[str]:
    """The concepts a prompt uses (installed names, <name> tokens, --with), noting name-shaped words that are not
    installed concepts (and installing them first with --install when a remote has them)."""
    from perfusion_hub.prompts import scan_prompt

    scan = scan_prompt(prompt, installed | set(with_names))
    for word in scan.unknown:
        if install_missing and not obj.offline:
            from registry.install import install

            try:
                install(obj.home, [word])
                installed.add(word)
                continue
            except NotFound:
                pass
        click.echo(f"note: '{word}' is not an installed concept, so it stays plain text "
                   f"(`pfx install {word}` or --install if it is one)", err=True)
    return list(dict.fromkeys(scan.names + [w for w in scan.unknown if w in installed] + list(with_names)))


def _write_png(image, path: Path, chunk: dict) -> Path:
    """A PNG that is not one render (grid, contact sheet): written atomically, with a pfx text chunk."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("pfx", json.dumps(chunk, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


@click.command()
@click.argument("prompt", required=False)
@click.option("--with", "with_names", multiple=True, help="Bind NAME to its superclass word in the prompt.")
@click.option("--base", help="Base model (default: PFX_BASE, config, else the embedded base).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), help="Denoising steps (default 25 toy, 50 otherwise).")
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--beta", multiple=True, help="NAME=VALUE gate bias (lower: stronger concept).")
@click.option("--tau", multiple=True, help="NAME=VALUE gate temperature.")
@click.option("--global-lock", is_flag=True, help="Global key-locking (useful beta about 0.4-0.6).")
@click.option("--sweep-beta", help="LO:HI:N: one labelled grid over N betas, same seed.")
@click.option("-n", "--count", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Images (seeds as one call draws them): OUTPUT's stem-<i>.png, and stem-grid.png with all.")
@click.option("--no-grid", is_flag=True, help="With -n N: write the N images only, no grid.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="render.png", show_default=True)
@click.option("--negative", help="Negative prompt.")
@click.option("--batch", "batch_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON Lines: one request per line (prompt, seed, count, concepts, beta, tau, negative, output), "
                   "rendered in batches with different concepts per image. No PROMPT then.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True,
              help="With --batch: images per denoising batch.")
@click.option("--contact-sheet", type=click.Path(dir_okay=False),
              help="With --batch: also write one labelled grid of every image here.")
@click.option("--install", "install_missing", is_flag=True, help="Install referenced concepts that are missing.")
@click.option("--device", help="cuda, cpu, mps (untested) or auto.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False))
@click.option("--tokenizer-2", "tokenizer_2", type=click.Path(exists=True, file_okay=False))
@json_option
@click.pass_obj
def render(obj, prompt, with_names, base, seed, steps, guidance, beta, tau, global_lock, sweep_beta, count, no_grid,
           output, negative, batch_file, batch_size, contact_sheet, install_missing, device, dtype, tokenizer,
           tokenizer_2, as_json):
    """Render PROMPT, composing the installed concepts it names (e.g. "cat-mittens on chair-eames").

    \b
    With --batch FILE, render every line of FILE instead, e.g.
      {"prompt": "a photo of cat-mittens", "seed": 1, "output": "mittens.png"}
      {"prompt": "a cat on chair-eames", "concepts": {"chair-eames": {"beta": 0.6}}, "count": 2}

    Images with different concepts share each denoising batch; each comes out as `pfx render` would render its
    line alone (seed for seed). A line without "output" writes OUTPUT's stem-<line number>.png. Steps, guidance,
    base and the negative prompt (the default for lines without one) are the command's.
    """
    betas, taus = _parse_assignments(beta, "--beta"), _parse_assignments(tau, "--tau")
    if batch_file:
        clash = [flag for flag, on in (("PROMPT", prompt), ("--with", with_names), ("--beta", beta), ("--tau", tau),
                                       ("--sweep-beta", sweep_beta), ("--global-lock", global_lock),
                                       ("-n", count != 1)) if on]
        if clash:
            raise UsageError(f"--batch takes its prompts and their settings from the file; drop {', '.join(clash)}")
        return _render_batch_file(obj, batch_file, base=base, seed=seed, steps=steps, guidance=guidance,
                                  output=output, negative=negative, batch_size=batch_size, contact_sheet=contact_sheet,
                                  install_missing=install_missing, device=device, dtype=dtype, tokenizer=tokenizer,
                                  tokenizer_2=tokenizer_2, as_json=as_json)
    if not prompt:
        raise UsageError("give a PROMPT to render (or --batch FILE)")
    if contact_sheet:
        raise UsageError("--contact-sheet goes with --batch (with -n N the grid is written by default)")
    sweep = _parse_sweep(sweep_beta) if sweep_beta else None
    home = obj.home
    installed = {r["name"] for r in home.installed()}
    names = _concept_names(obj, installed, prompt, with_names, install_missing)
    pairs = installed_concepts(obj, names, install_missing=install_missing)
    value = base_value(obj, base)
    from perfusion_hub.bases import resolve_spec
    from perfusion_hub.render import beta_grid
    from perfusion_hub.render import render as do_render

    b = open_base(obj, value, device=device, dtype=dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    concepts, cov = concepts_for(obj, b, pairs)
    steps = steps or (25 if resolve_spec(value).kind == "embedded" else 50)
    kw = {"concepts": concepts, "covariance": cov, "with_names": list(with_names), "seed": seed, "steps": steps,
          "guidance": guidance, "global_lock": global_lock, "negative_prompt": negative}
    t0 = time.perf_counter()
    if sweep:
        if taus:
            kw["tau"] = taus
        grid, used = beta_grid(b, prompt, sweep, **kw)
        out = Path(output)
        tmp = out.with_name(f".{out.name}.tmp")
        grid.save(tmp, format="PNG")
        tmp.replace(out)
        info = {"files": [str(out)], "concepts": used, "betas": sweep}
    else:
        res = do_render(b, prompt, count=count, beta=betas, tau=taus, **kw)
        files = res.save(output)
        info = {"files": [str(f) for f in files], "concepts": res.concepts, "prompt": res.prompt,
                "params": res.params}
        if count > 1 and not no_grid:
            from perfusion_hub.batch import image_grid

            out = Path(output)
            grid_path = out.with_name(f"{out.stem}-grid{out.suffix or '.png'}")
            _write_png(image_grid(res.images), grid_path, dict(res.params, grid=[str(f) for f in files]))
            info["grid"] = str(grid_path)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    emit(info, as_json, lambda d: click.echo("\n".join(d["files"] + ([d["grid"]] if d.get("grid") else []))))


def _render_batch_file(obj, batch_file, *, base, seed, steps, guidance, output, negative, batch_size, contact_sheet,
                       install_missing, device, dtype, tokenizer, tokenizer_2, as_json):
    """`pfx render --batch FILE`: check every line first (naming the bad one), then render in batches."""
    from cli.render_spec import SpecError, read_batch_file

    out = Path(output)
    try:
        lines = read_batch_file(batch_file, default_seed=seed, default_negative=negative,
                                default_output=lambda n: out.with_name(f"{out.stem}-{n}{out.suffix or '.png'}"))
    except SpecError as e:
        raise UsageError(str(e)) from None
    home = obj.home
    installed = {r["name"] for r in home.installed()}
    names: list[str] = []
    for _, spec in lines:
        names += _concept_names(obj, installed, spec.prompt, spec.with_names, install_missing)
    pairs = installed_concepts(obj, list(dict.fromkeys(names)), install_missing=install_missing)
    value = base_value(obj, base)
    from perfusion_hub.bases import resolve_spec
    from perfusion_hub.batch import check_request, image_grid, render_batch
    from perfusion_hub.errors import BadInput
    from perfusion_hub.render import ensure_loaded

    b = open_base(obj, value, device=device, dtype=dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    concepts, cov = concepts_for(obj, b, pairs)
    ensure_loaded(b, concepts, cov)
    for n, spec in lines:
        try:
            check_request(b, spec.request())
        except BadInput as e:
            raise UsageError(f"{batch_file}, line {n}: {e}") from None
    steps = steps or (25 if resolve_spec(value).kind == "embedded" else 50)
    chunks: list[list] = []
    for item in lines:  # whole lines, at most batch_size images a batch (a larger line alone)
        if chunks and sum(s.count for _, s in chunks[-1]) + item[1].count <= batch_size:
            chunks[-1].append(item)
        else:
            chunks.append([item])
    total = sum(s.count for _, s in lines)
    t0 = time.perf_counter()
    files, sheet, labels = [], [], []
    with progress(total, "render") as bar:
        for chunk in chunks:
            results = render_batch(b, [s.request() for _, s in chunk], concepts=concepts, covariance=cov, steps=steps,
                                   guidance=guidance)
            for (n, spec), res in zip(chunk, results):
                files += [str(f) for f in res.save(spec.output)]
                if contact_sheet:
                    sheet += res.images
                    labels += [f"{n}" if spec.count == 1 else f"{n}.{i}" for i in range(spec.count)]
            bar.update(sum(s.count for _, s in chunk))
    info = {"files": files, "lines": len(lines), "images": total, "batches": len(chunks), "steps": steps,
            "seconds": round(time.perf_counter() - t0, 2)}
    if contact_sheet:
        _write_png(image_grid(sheet, labels=labels, max_side=256), Path(contact_sheet),
                   {"contact_sheet": files, "batch_file": str(batch_file)})
        info["contact_sheet"] = str(contact_sheet)
    emit(info, as_json, lambda d: click.echo("\n".join(d["files"] + ([d["contact_sheet"]] if contact_sheet else []))))


@click.group("base")
def base_group():
    """Register base models and prepare their covariance."""


@base_group.command("list")
@json_option
@click.pass_obj
def base_list(obj, as_json):
    """Embedded and registered bases, with their family (sd1, sd2, sdxl) and whether each is the default."""
    from perfusion_hub.bases import EMBEDDED, detect_family, resolve_spec

    home = obj.home
    rows = [{"name": n, "location": "(embedded)", "family": detect_family(resolve_spec(n)), "default": False}
            for n in EMBEDDED]
    for n, spec in sorted(home.config.get("bases", {}).items()):
        rows.append({"name": n, "location": spec["location"], "family": spec.get("family"), "default": False})
    default = os.environ.get("PFX_BASE") or home.config.get("default_base") or "toy"
    for r in rows:
        r["default"] = r["name"] == default
    emit(rows, as_json, lambda rs: table(rs, [("name", "NAME"), ("family", "FAMILY"), ("location", "LOCATION"),
                                              ("default", "DEFAULT")]))


@base_group.command("add")
@click.argument("name")
@click.argument("location")
@click.option("--default", "make_default", is_flag=True, help="Use it when --base is not given.")
@click.option("--compatible-with", multiple=True, help="Base digest whose concepts this base accepts.")
@click.pass_obj
def base_add(obj, name, location, make_default, compatible_with):
    """Register LOCATION (diffusers folder, .safetensors file or Hub id) under NAME."""
    from perfusion_hub.bases import EMBEDDED, detect_family, resolve_spec
    from registry.names import validate_name

    validate_name(name)
    if name in EMBEDDED:
        raise UsageError(f"{name} is an embedded base name; choose another")
    spec = resolve_spec(location)
    loc = spec.location
    family = detect_family(spec)  # None: a Hub model not in the cache yet (known once it is loaded)
    with obj.home.edit_config() as cfg:
        cfg.setdefault("bases", {})[name] = {"location": loc, "kind": spec.kind}
        if family:
            cfg["bases"][name]["family"] = family
        if compatible_with:
            cfg["bases"][name]["compatible"] = list(compatible_with)
        if make_default:
            cfg["default_base"] = name
    click.echo(f"registered base {name} -> {loc}" + (f" ({family})" if family else ""))


@base_group.command("prepare")
@click.option("--base", help="Base model (default as for render).")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), help="Caption file (default: pfx's).")
@click.option("--device")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False))
@click.option("--tokenizer-2", "tokenizer_2", type=click.Path(exists=True, file_okay=False))
@json_option
@click.pass_obj
def base_prepare(obj, base, captions, device, tokenizer, tokenizer_2, as_json):
    """Compute the base digest and its covariance C once, and keep them in the store."""
    t0 = time.perf_counter()
    b = open_base(obj, base_value(obj, base), device=device, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    cov = base_covariance(obj, b, captions)
    info = {"base": b.name, "base_digest": b.digest, "covariance": cov.digest, "corpus_digest": cov.corpus_digest,
            "family": b.family, "text_dims": b.text_dims, "dim": b.dim, "layers": len(b.layers()),
            "seconds": round(time.perf_counter() - t0, 2)}
    emit(info, as_json, lambda d: click.echo(
        f"{d['base']} ({d['family']}, {'+'.join(map(str, d['text_dims']))}-d text, {d['layers']} attn2 layers): "
        f"digest {d['base_digest'][:19]}..., covariance {d['covariance'][:19]}... ({d['seconds']} s)"))

