"""The ``edgekit`` command line: parse, call the library, render with rich. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgekit import __version__
from edgekit.errors import EdgekitError

app = typer.Typer(
    help="Export trained PyTorch models for phones and NPUs, verify them, run them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
zoo_app = typer.Typer(help="The real models that install offline.", no_args_is_help=True)
recipes_app = typer.Typer(help="Named recipes: a transform and its settings.", no_args_is_help=True)
devices_app = typer.Typer(help="Device profiles of real NPUs and mobile CPUs.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(recipes_app, name="recipes")
app.add_typer(devices_app, name="devices")

console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"edgekit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """edgekit: the deployment SDK for edge and mobile ML."""


# -- zoo ------------------------------------------------------------------------------------------
@zoo_app.command("list")
def zoo_list() -> None:
    """List the zoo models."""
    from edgekit.models.zoo import ZOO

    table = Table(title="edgekit zoo")
    for column in ("name", "task", "data", "description"):
        table.add_column(column)
    for entry in ZOO.values():
        table.add_row(entry.name, entry.task, entry.dataset, entry.description)
    console.print(table)


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Argument(help="zoo model name, e.g. smollm2-135m")]) -> None:
    """Load a zoo model for real and print its shape facts."""
    from edgekit.models import load
    from edgekit.models.zoo import zoo_entry

    entry = zoo_entry(name)
    bundle = load(f"zoo:{entry.name}")
    table = Table(title=f"zoo:{entry.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("description", bundle.description or entry.description)
    table.add_row("task", bundle.task)
    table.add_row("parameters", f"{bundle.parameter_count():,}")
    for input_name, tensor in bundle.example_inputs.items():
        dynamic = bundle.dynamic_axes.get(input_name, {})
        shape = [dynamic.get(axis, size) for axis, size in enumerate(tensor.shape)]
        table.add_row(f"input {input_name}", f"{str(tensor.dtype).removeprefix('torch.')} {shape}")
    table.add_row("outputs", ", ".join(bundle.output_names))
    table.add_row("data set", bundle.dataset or "-")
    table.add_row("source hash", bundle.source_hash[:16])
    for key, value in bundle.meta.items():
        if isinstance(value, int | float | str) and not key.startswith("_"):
            table.add_row(key, str(value))
    console.print(table)


# -- recipes --------------------------------------------------------------------------------------
@recipes_app.command("list")
def recipes_list() -> None:
    """List the shipped recipes."""
    from edgekit import recipes

    table = Table(title="edgekit recipes")
    for column in ("name", "transform", "description"):
        table.add_column(column)
    for name in recipes.names():
        recipe = recipes.load(name)
        table.add_row(recipe.name, recipe.transform, recipe.description)
    console.print(table)


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="recipe name or path to a recipe .toml")],
    overrides: Annotated[list[str] | None, typer.Option("--set", help="override a setting: key=value")] = None,
) -> None:
    """Show a recipe with its resolved settings."""
    from edgekit import recipes

    recipe = recipes.load(name, recipes.parse_overrides(overrides or []))
    resolved = recipe.as_dict()
    table = Table(title=f"recipe {recipe.name}: {recipe.description}", show_header=True)
    table.add_column("setting")
    table.add_column("value")
    table.add_row("transform", recipe.transform)
    for section in ("settings", "verify"):
        for key, value in resolved[section].items():
            table.add_row(f"{section}.{key}" if section == "verify" else key, str(value))
    console.print(table)


def main() -> None:
    """Console entry point: a user's mistake is one red line and exit code 2, never a traceback."""
    try:
        app()
    except EdgekitError as error:
        message = Text("error: ", style="bold red")
        message.append(str(error))
        Console(stderr=True, soft_wrap=True).print(message, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
