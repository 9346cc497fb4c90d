"""`rlgen plugins` and `rlgen env`: what is registered, and what a bug report needs."""
from __future__ import annotations

import platform
import sys

import typer

from rlgen.cli import options as opt

PLUGINS_HELP = """List every registered item by kind with the package that provides it.

Example:

    rlgen plugins --json
"""

ENV_HELP = """Versions, devices and the active kernel backend: paste this into bug reports.

Example:

    rlgen env --json
"""


def plugin_listing() -> dict[str, list[dict]]:
    """{kind: [{name, provider, description, status}]}: every registered item (commands included when
    the CLI loaded them), each dropped item of a name clash (status "dropped", `kept_by` the package that
    holds the name), each plugin item dropped for breaking its kind's contract (status "dropped"), and
    under kind "plugin" every third-party plugin with its distribution, version, status ("ok" / "broken")
    and error."""
    from rlgen import plugins

    listing: dict[str, list[dict]] = {}
    kinds = dict(plugins.registries())
    commands = plugins.commands()
    if commands is not None:
        kinds[plugins.COMMAND_KIND] = commands
    clashes = plugins.clashes()
    for kind, registry in kinds.items():
        rows = [{"name": e.name, "provider": e.provider, "description": e.description, "status": "ok"} for e in registry]
        rows += [{"name": c.name, "provider": c.dropped, "description": f"dropped: the name is taken by package '{c.kept}'",
                  "status": "dropped", "kept_by": c.kept} for c in clashes if c.kind == kind]
        rows += [{"name": r.name, "provider": r.provider, "description": f"dropped: {r.problem}", "status": "dropped"}
                 for r in plugins.rejected() if r.kind == kind]
        listing[kind] = sorted(rows, key=lambda row: (row["name"], row["status"] != "ok"))
    listing["plugin"] = [
        {"name": info.name, "provider": info.distribution or info.name, "version": info.version,
         "description": info.error or "", "status": info.status, "error": info.error}
        for info in plugins.plugin_infos()
    ]
    return listing


def plugins(json_output: bool = opt.Json):
    from rlgen.cli.report import Reporter

    reporter = Reporter(json_output=json_output)
    listing = plugin_listing()
    if json_output:
        reporter.emit_json(listing)
        return
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for column in ("kind", "name", "package", "status", "description"):
        table.add_column(column)
    for kind, entries in listing.items():
        for entry in entries:
            table.add_row(kind, entry["name"], entry["provider"], entry["status"], entry["description"])
    from rich.console import Console

    Console(highlight=False).print(table)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _kernel_info() -> dict:
    """Which log-prob kernels run on each device, and why a native one is missing."""
    import torch

    from rlgen import kernels

    info = {"mode": kernels.mode(), "cpu": kernels.describe("cpu")}
    missing = kernels.native_import_error("_native")
    if missing:
        info["cpu_native_missing"] = missing
    if torch.cuda.is_available():
        info["cuda"] = kernels.describe("cuda")
    else:
        built = kernels.native_import_error("_native_cuda") is None
        info["cuda"] = "no GPU (native-cuda built)" if built else "no GPU (native-cuda not built)"
    return info


def _device_rows() -> list[dict]:
    """Every device a run can use (rlgen.devices.device_listing) with the log-prob and merge kernels that
    run there."""
    from rlgen import kernels
    from rlgen.devices import device_listing
    from rlgen.merging import kernels as merge_kernels

    return [{**row, "logprob_kernel": kernels.backend_name(row["device"]),
             "merge_kernel": merge_kernels.backend_name(row["device"])} for row in device_listing()]


def _plugins() -> list[dict]:
    """Installed plugins (entry points of the "rlgen" group) with their distribution versions; broken
    ones with their error."""
    from rlgen.plugins import plugin_infos

    return [info.as_dict() for info in plugin_infos()]


def env(json_output: bool = opt.Json):
    import torch

    from rlgen import __version__, kernels
    from rlgen.cli.report import Reporter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {
        "rlgen": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "kernel_backend": kernels.backend_name(device),
        "kernels": _kernel_info(),
        "devices": _device_rows(),
        "packages": {p: _version(p) for p in ("transformers", "safetensors", "tokenizers", "peft", "pluggy", "typer", "rich", "trl", "diffusers")},
        "plugins": _plugins(),
    }
    reporter = Reporter(json_output=json_output)
    if json_output:
        reporter.emit_json(info)
        return
    for key, value in info.items():
        if key == "plugins":
            for plugin in value:
                state = "" if plugin["status"] == "ok" else f" (broken: {plugin['error']})"
                typer.echo(f"plugins.{plugin['name']}: {plugin['distribution']} {plugin['version']}{state}")
            if not value:
                typer.echo("plugins: none")
        elif key == "devices":
            for row in value:
                details = ", ".join(f"{k}={v}" for k, v in row.items() if k != "device")
                typer.echo(f"devices.{row['device']}: {details}")
        elif isinstance(value, dict):
            for inner, v in value.items():
                typer.echo(f"{key}.{inner}: {v if v is not None else 'not installed'}")
        else:
            typer.echo(f"{key}: {value}")


def register(app: typer.Typer) -> None:
    app.command("plugins", help=PLUGINS_HELP)(plugins)
    app.command("env", help=ENV_HELP)(env)
