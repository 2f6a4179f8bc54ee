"""``medzip train``: train the learned codec's models into a new model folder.

``medzip train local --out models/local-lm/v3 --seed 0 --minutes 8`` and
``medzip train global --out models/global-vae/v3 --seed 0 --minutes 4`` call the learned
modules' ``train()`` functions, and ``medzip train prior --out models/pred-prior/v2`` makes
the predictive coder's prior (:mod:`medzip_scp.codec.predictive.prior_train`). They show
progress on stderr and end with a summary table. They
refuse to write into a folder that already holds a model (``manifest.json``), and into any
folder of a released model (:data:`medzip_scp.codec.zoo.MODELS`): model ids are never reused.
torch is imported only when a command runs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from medzip_scp.codec.zoo import DEFAULT_MODELS_ROOT, DEFAULT_TRAINING_DATA, MODELS

__all__ = ["train_app"]

train_app = typer.Typer(
    help="Train the codec's models (local: low planes; global: high planes; prior: the "
    "predictive coder's starting model).",
    no_args_is_help=True,
)


QuantizeOpt = Annotated[
    Path | None,
    typer.Option(
        "--quantize-from",
        exists=True,
        file_okay=False,
        help="Train nothing: write the integer model (integer-exact decoding) of this trained "
        "model folder, e.g. models/local-lm/v1 or models/global-vae/v1, to --out.",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", help="New model folder, e.g. models/local-lm/v3.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of numpy and torch.")]
MinutesOpt = Annotated[float, typer.Option("--minutes", help="Wall-time budget of training.")]
DataOpt = Annotated[Path, typer.Option("--data", help="The shared data folder (training data).")]


def _refuse_released(out: Path) -> None:
    """Exit 2 when ``out`` holds a model or is the folder of a released one."""
    out_r = out.resolve()
    for entry in MODELS.values():
        if out_r == (DEFAULT_MODELS_ROOT / entry.folder).resolve():
            _fail(
                f"{out} is the folder of released model {entry.model_id!r}; model ids are never "
                "reused: choose a new version folder"
            )
    if (out / "manifest.json").exists():
        _fail(f"{out} already holds a model (manifest.json); choose a new version folder")


def _fail(msg: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


def _progress(console: Console, started: float) -> Any:
    def show(event: Any) -> None:
        elapsed = time.perf_counter() - started
        if isinstance(event, dict):
            text = " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items()
            )
        else:
            text = str(event)
        console.print(f"[dim]{elapsed:7.1f}s[/dim] {text}", highlight=False)

    return show


def _summary(title: str, rows: dict[str, Any]) -> None:
    table = Table(title=title)
    table.add_column("field")
    table.add_column("value")
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        table.add_row(key, str(value))
    Console(stderr=True).print(table)


@train_app.command("local")
def train_local(
    out: OutOpt,
    seed: SeedOpt = 0,
    minutes: MinutesOpt = 6.0,
    data: DataOpt = DEFAULT_TRAINING_DATA,
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", help="Train this LoRA adapter (ct, mr) on the model in --out."),
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="torch threads.")] = 1,
    quantize_from: QuantizeOpt = None,
) -> None:
    """Train the local-path model (low bit planes) from scratch, or one LoRA adapter; or
    quantise a trained one (--quantize-from)."""
    if quantize_from is not None:
        _refuse_released(out)
        from medzip_scp.codec.learned.local_path.quantize import quantize_model

        info = quantize_model(quantize_from, out)
        _summary(f"local-path quantisation -> {out}", info)
        sys.stdout.write(json.dumps(info) + "\n")
        return
    if not data.is_dir():
        _fail(f"data folder {data} not found")
    if adapter is None:
        _refuse_released(out)
    elif any(
        (out.resolve() == (DEFAULT_MODELS_ROOT / e.folder).resolve()) for e in MODELS.values()
    ):
        _fail(f"{out} is a released model; adapters go into a new model version")
    elif (out / "adapters" / adapter).exists():
        _fail(f"{out}/adapters/{adapter} already exists")
    import torch

    from medzip_scp.codec.learned.local_path import train as local_train

    torch.set_num_threads(threads)
    console = Console(stderr=True)
    started = time.perf_counter()
    if adapter is None:
        info = local_train.train(data, out, seed, minutes, progress=_progress(console, started))
    else:
        info = local_train.train_adapter(
            data, out, adapter, seed, minutes, progress=_progress(console, started)
        )
    _summary(f"local-path training -> {out}", info)
    sys.stdout.write(json.dumps(info) + "\n")


@train_app.command("global")
def train_global(
    out: OutOpt,
    seed: SeedOpt = 0,
    minutes: MinutesOpt = 4.0,
    data: DataOpt = DEFAULT_TRAINING_DATA,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Exact number of steps (reproducible).")
    ] = None,
    quantize_from: QuantizeOpt = None,
) -> None:
    """Train the global-path model (high bit planes, bits-back latent classes); or write the
    exact-integer-table version of a trained one (--quantize-from)."""
    _refuse_released(out)
    from medzip_scp.codec.learned.global_path import train as global_train

    if quantize_from is not None:
        info = global_train.quantize_from(quantize_from, out)
        _summary(f"global-path quantisation -> {out}", info)
        sys.stdout.write(json.dumps(info) + "\n")
        return
    if not data.is_dir():
        _fail(f"data folder {data} not found")

    console = Console(stderr=True)
    started = time.perf_counter()
    info = global_train.train(
        data, out, seed, minutes, progress=_progress(console, started), steps=steps
    )
    keys = ("model_id", "sha256", "steps", "heldout_crop_bpp_start", "heldout_crop_bpp_final")
    _summary(
        f"global-path training -> {out}",
        {**{k: info.get(k) for k in keys}, "wall_s": info.get("wall_s")},
    )
    sys.stdout.write(json.dumps({k: info.get(k) for k in (*keys, "wall_s")}) + "\n")


@train_app.command("prior")
def train_prior(out: OutOpt, data: DataOpt = DEFAULT_TRAINING_DATA) -> None:
    """Make the predictive coder's prior: the adaptive model small frames start from,
    learned from small MR frames of the shared data (deterministic, seconds)."""
    _refuse_released(out)
    if not data.is_dir():
        _fail(f"data folder {data} not found")
    from medzip_scp.codec.predictive import prior_train

    console = Console(stderr=True)
    started = time.perf_counter()
    show = _progress(console, started)
    info = prior_train.train(data, out, progress=show)
    _summary(f"predictive-coder prior -> {out}", info)
    sys.stdout.write(json.dumps(info) + "\n")
