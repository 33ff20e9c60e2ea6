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
cloud_app = typer.Typer(help="The CEMA cloud adaptation service.", no_args_is_help=True)
token_app = typer.Typer(help="Issue and revoke per-device tokens.", no_args_is_help=True)
cloud_app.add_typer(token_app, name="token")
app.add_typer(cloud_app, name="cloud")

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
            shown = "unset (the model's default)" if value is None else str(value)
            table.add_row(f"{section}.{key}" if section == "verify" else key, shown)
    console.print(table)


# -- export ---------------------------------------------------------------------------------------
@app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="zoo:NAME, a Hugging Face model dir, pkg.module:factory or a .pt2")],
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle directory to write")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe name or .toml path")] = "fp32",
    device: Annotated[str, typer.Option("--device", "-d", help="device profile (edgekit devices list)")] = (
        "x86-cpu-onnxruntime"
    ),
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx, pte or all")] = "all",
    calib: Annotated[str | None, typer.Option("--calib", help="data set name, .npz/.npy folder or text file")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="override a recipe setting: key=value")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved plan and do nothing")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --out directory")] = False,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="export fp32 alongside to measure size/latency ratios")
    ] = True,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="real-data samples for the quality figure")] = 64,
) -> None:
    """Export MODEL with a recipe for a device: transform, export, verify three ways, check, write a bundle."""
    from edgekit import pipeline

    plan = pipeline.plan_export(model, recipe, device, out, fmt, calib, overrides, force, baseline, eval_samples)
    if dry_run:
        table = Table(title="export plan (dry run: nothing is loaded or written)", show_header=False)
        for key, value in plan.describe().items():
            table.add_row(key, str(value))
        console.print(table)
        return
    result = pipeline.run_export(plan)
    _print_summary(result.report)
    console.print(f"bundle written to [bold]{result.out}[/] (report.md, report.json, manifest.json)")


def _print_summary(report: dict) -> None:
    from edgekit.exporters.report import summary_rows

    header, *rows = summary_rows(report)
    table = Table(title="export summary")  # one column per format: reads well in 80 columns
    table.add_column(header[0], style="bold")
    for row in rows:
        table.add_column(row[0])
    for index, label in enumerate(header[1:], start=1):
        table.add_row(label, *(row[index] for row in rows))
    console.print(table)
    for fmt, entry in report["formats"].items():
        check = entry["device_check"]
        if check.get("reasons"):
            console.print(f"[yellow]{fmt}[/] on {check['device']}: " + "; ".join(check["reasons"]), highlight=False)


# -- bundles on the edge --------------------------------------------------------------------------
@app.command("inspect")
def inspect_bundle(bundle: Annotated[Path, typer.Argument(help="bundle directory")]) -> None:
    """Print a bundle's manifest and report summary."""
    import json

    from edgekit.runtime.manifest import Manifest

    manifest = Manifest.read(bundle)
    table = Table(title=f"bundle {bundle}", show_header=False)
    table.add_row("model", f"{manifest.model['spec']} ({manifest.task})")
    table.add_row("recipe", str(manifest.recipe.get("name")))
    table.add_row("device", manifest.device)
    for fmt, spec in manifest.formats.items():
        for graph_name, graph in spec.graphs.items():
            inputs = ", ".join(f"{t.name}:{t.dtype}{t.shape}" for t in graph.inputs)
            outputs = ", ".join(f"{t.name}:{t.dtype}{t.shape}" for t in graph.outputs[:3])
            more = f" (+{len(graph.outputs) - 3})" if len(graph.outputs) > 3 else ""
            table.add_row(f"{fmt}/{graph_name}", f"{graph.file}: {inputs} → {outputs}{more}")
    console.print(table)
    report_path = bundle / "report.json"
    if report_path.is_file():
        _print_summary(json.loads(report_path.read_text()))


@app.command("run")
def run_bundle(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    input_file: Annotated[Path | None, typer.Option("--input", "-i", help=".npz with one array per input")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="text prompt (language-model bundles)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="onnx or pte (default: onnx if present)")] = None,
    depth: Annotated[
        str | None, typer.Option("--depth", help="sorted bundles: a depth, 'auto' (with --budget-ms) or 'dynamic'")
    ] = None,
    budget_ms: Annotated[
        float | None, typer.Option("--budget-ms", help="sorted bundles: deepest depth within this decode ms/token")
    ] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="zoo:vlm-dinov2-smollm2: an image file, photo:NAME or scene:N")
    ] = None,
    keep: Annotated[float, typer.Option("--keep", help="VLM: share of visual tokens HiRED keeps (1 = all)")] = 0.2,
) -> None:
    """Run a bundle in the edge runtime on an .npz input or a prompt; or ask the zoo VLM about an image."""
    import numpy as np

    from edgekit import runtime

    if image is not None:
        _run_vlm(str(bundle), image, prompt, keep, max_new_tokens)
        return
    session = runtime.load(bundle, fmt)
    if prompt is not None:
        tokenizer = session.tokenizer
        ids = tokenizer.encode(prompt).ids
        if session.is_sorted:
            from edgekit.runtime.sorted import SortedModel

            eos = set((session.manifest.language_model or {}).get("eos_token_ids", []))
            result = SortedModel.from_session(session).generate(
                ids, max_new_tokens, depth=depth, budget_ms=budget_ms, eos_ids=eos
            )
            console.print(prompt + tokenizer.decode(result.tokens), highlight=False, markup=False)
            console.print(
                f"[dim]{result.depth_mode}: {len(result.tokens)} tokens in {result.seconds:.2f} s, "
                f"mean depth {result.mean_depth:.1f}[/]"
            )
            return
        generated = session.generate(ids, max_new_tokens, depth=depth, budget_ms=budget_ms)
        console.print(prompt + tokenizer.decode(generated), highlight=False, markup=False)
        return
    if depth is not None or budget_ms is not None:
        raise EdgekitError("--depth and --budget-ms apply to --prompt on a sorted bundle")
    if input_file is None:
        raise EdgekitError("pass --input x.npz (or --prompt for a language-model bundle)")
    if not input_file.is_file():
        raise EdgekitError(f"no such input file: {input_file}")
    try:
        with np.load(input_file, allow_pickle=False) as loaded:
            feeds = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError) as error:
        raise EdgekitError(f"{input_file} is not a readable .npz file ({error})") from None
    outputs = session.run(feeds)
    labels = session.manifest.model.get("labels")
    for name, value in outputs.items():
        console.print(f"[bold]{name}[/] {value.dtype} {list(value.shape)}")
        if labels and value.ndim == 2 and value.shape[-1] == len(labels):
            for row in value:
                top = np.argsort(row)[::-1][:5]
                console.print("  top-5: " + ", ".join(f"{labels[i]} ({row[i]:.2f})" for i in top), markup=False)
        else:
            console.print(np.array2string(value.reshape(-1)[:16], precision=4), markup=False)


def _run_vlm(spec: str, image: str, prompt: str | None, keep: float, max_new_tokens: int) -> None:
    """``edgekit run zoo:vlm-dinov2-smollm2 --image ... --prompt ...`` (torch, HiRED at ``keep``)."""
    if spec != "zoo:vlm-dinov2-smollm2":
        raise EdgekitError("--image needs the model zoo:vlm-dinov2-smollm2")
    if not prompt:
        raise EdgekitError("--image needs a question: --prompt 'What is in the top-left?'")
    if not 0.0 < keep <= 1.0:
        raise EdgekitError(f"--keep must be in (0, 1], got {keep:g}")
    from edgekit.vlm.model import load_image, load_model

    picture = load_image(image)
    answer = load_model().answer(picture, prompt, "hired", keep, max_new_tokens)
    console.print(answer.text, highlight=False, markup=False)
    console.print(
        f"[dim]HiRED r={keep:g}: {answer.visual_tokens} of 320 visual tokens, {answer.prompt_tokens}-token prompt, "
        f"first token {answer.ttft_s * 1e3:.0f} ms[/]"
    )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


# -- devices --------------------------------------------------------------------------------------
@devices_app.command("list")
def devices_list() -> None:
    """List the device profiles."""
    from edgekit import devices

    table = Table(title="device profiles")
    for column in ("name", "vendor", "runtime", "formats", "peak int8 TOPS", "bandwidth GB/s", "memory GB"):
        table.add_column(column, no_wrap=column in ("name", "runtime"))
    for name in devices.list_profiles():
        profile = devices.load_profile(name)
        table.add_row(
            profile.name,
            profile.vendor,
            profile.runtime,
            ", ".join(profile.formats),
            _number(profile.peak_tops.get("int8")),
            _number(profile.bandwidth_gbps),
            f"{profile.capacity_bytes / 2**30:.3g}",
        )
    console.print(table)


@devices_app.command("show")
def devices_show(name: Annotated[str, typer.Argument(help="device profile name")]) -> None:
    """Show every field of a device profile with its source."""
    from edgekit import devices

    profile = devices.load_profile(name)
    table = Table(title=f"device {name}")
    for column in ("field", "value", "source"):
        table.add_column(column)
    for field_name, value, source in profile.rows():
        table.add_row(field_name, value, source)
    console.print(table)


# -- CEMA: edge daemon and cloud service -------------------------------------------------------------
@app.command("adapt")
def adapt(
    bundle: Annotated[Path, typer.Argument(help="adaptable bundle (edgekit cloud bundle)")],
    server: Annotated[str, typer.Option("--server", help="cloud URL, e.g. http://127.0.0.1:8470")],
    token: Annotated[str, typer.Option("--token", help="this device's token (edgekit cloud token issue)")],
    stream: Annotated[str, typer.Option("--stream", help="fmnist-c:CORRUPTION:SEVERITY[:N], a folder, or -")],
    device: Annotated[str, typer.Option("--device", help="device id the token was issued for")] = "edge-0",
    state: Annotated[Path, typer.Option("--state", help="queue and applied parameters live here")] = Path(
        ".edgekit-adapt"
    ),
    batch: Annotated[int, typer.Option("--batch")] = 64,
    rate: Annotated[float | None, typer.Option("--rate", help="frames per second (default: unpaced)")] = None,
    flush_s: Annotated[float, typer.Option("--flush-seconds", help="upload time granted at stop")] = 5.0,
) -> None:
    """Run the CEMA cloud-edge adaptation daemon on a stream (stops cleanly on Ctrl-C / SIGTERM)."""
    import json
    import signal
    import threading

    from edgekit.runtime.adapt import run_adaptation

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    report = run_adaptation(
        bundle,
        server,
        token,
        device,
        stream,
        state,
        batch=batch,
        stop=stop,
        log=lambda line: console.print(line, markup=False, highlight=False),
        rate=rate,
        flush_s=flush_s,
    )
    summary = report.to_dict()
    summary.pop("accuracy_log")
    console.print(json.dumps(summary), markup=False, highlight=False)


@cloud_app.command("serve")
def cloud_serve(
    teacher: Annotated[str, typer.Option("--teacher", help="foundation model spec, e.g. zoo:fmnist-foundation")],
    student: Annotated[str, typer.Option("--student", help="edge model spec, e.g. zoo:fmnist-cnn")],
    db: Annotated[Path, typer.Option("--db", help="SQLite state file")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8470,
) -> None:
    """Serve CEMA: receive edge samples, adapt the foundation model, distil the student's norm layers."""
    from edgekit.cloud.server import serve

    serve(teacher, student, str(db), host, port)


@cloud_app.command("bundle")
def cloud_bundle(
    student: Annotated[str, typer.Argument(help="edge model spec, e.g. zoo:fmnist-cnn")],
    out: Annotated[Path, typer.Argument(help="bundle directory to write")],
    force: Annotated[bool, typer.Option("--force", help="replace an existing directory")] = False,
) -> None:
    """Export a student as an adaptable edge bundle (pixel input; norm parameters as ONNX graph inputs)."""
    from edgekit.cloud.export import export_adaptable
    from edgekit.models.sources import load

    path = export_adaptable(load(student), out, overwrite=force)
    console.print(f"wrote {path}")


@token_app.command("issue")
def token_issue(
    device: Annotated[str, typer.Argument(help="device id")],
    db: Annotated[Path, typer.Option("--db", help="the service's SQLite state file")],
) -> None:
    """Issue a new token for a device (printed once; only its hash is stored)."""
    from edgekit.cloud.store import Store
    from edgekit.runtime.wire import CLIENT_PATTERN

    if not CLIENT_PATTERN.match(device):
        raise EdgekitError("device ids are 1-64 letters, digits, '-' or '_'")
    store = Store(db)
    print(store.issue_token(device))
    store.close()


@token_app.command("revoke")
def token_revoke(
    device: Annotated[str, typer.Argument(help="device id")],
    db: Annotated[Path, typer.Option("--db", help="the service's SQLite state file")],
) -> None:
    """Revoke every live token of a device."""
    from edgekit.cloud.store import Store

    store = Store(db)
    console.print(f"revoked {store.revoke(device)} token(s) of {device}")
    store.close()


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
