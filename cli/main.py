"""`pfx`: the click group. Command families live in their own modules and register themselves here.

Only train/render/base import torch or diffusers, and only inside the command body, so listing,
searching and installing start fast.
"""

from __future__ import annotations

import sys

import click

from cli.output import json_option
from registry.errors import EXIT_CODES

EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code:>2}  {text}" for code, text in sorted(EXIT_CODES.items()))


class Context:
    def __init__(self, home: str | None, offline: bool, debug: bool):
        self.home_path = home
        self.offline = offline
        self.debug = debug
        self._home = None

    @property
    def home(self):
        """The registry home (store + index + config), opened on first use."""
        if self._home is None:
            from registry.home import Home

            self._home = Home.open(self.home_path, offline=self.offline)
        return self._home


class UserError(click.ClickException):
    """A user-caused error (PfxError, bad concept file, engine input error) with its stable exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class PfxGroup(click.Group):
    """Maps the library's user-facing exceptions to UserError, so exit codes are the same whether pfx
    runs as a program or under click's CliRunner. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            from cli.output import error_exit_code

            code = error_exit_code(e)
            debug = isinstance(ctx.obj, Context) and ctx.obj.debug
            if code is None or debug:
                raise
            raise UserError(str(e), code) from e


@click.group(cls=PfxGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="PFX_HOME", type=click.Path(file_okay=False), help="Home folder (env PFX_HOME).")
@click.option("--offline", is_flag=True, envvar="PFX_OFFLINE", help="Never open a socket (env PFX_OFFLINE=1).")
@click.option("--debug", is_flag=True, envvar="PFX_DEBUG", help="Show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, home: str | None, offline: bool, debug: bool) -> None:
    """pfx: train, share and compose tiny Perfusion concepts for text-to-image models."""
    ctx.obj = Context(home, offline, debug)


@cli.command()
@json_option
def version(as_json: bool) -> None:
    """Show pfx's version (and the library versions it would use)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    from cli.output import emit

    info = {}
    for pkg in ("perfusion-hub", "torch", "diffusers", "transformers", "safetensors", "boto3", "sqlite-utils"):
        try:
            info[pkg] = v(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    emit(info, as_json, lambda d: click.echo("\n".join(f"{k} {val or '-'}" for k, val in d.items())))


def _register() -> None:
    import importlib

    for mod in ("cli.cmd_local", "cli.cmd_remote", "cli.cmd_engine", "cli.cmd_keys", "cli.cmd_card", "cli.cmd_serve"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(cli)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="pfx", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
