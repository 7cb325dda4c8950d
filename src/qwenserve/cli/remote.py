"""`qwenserve run SLUG --server URL ...`: the same command, run by a server over v2.

The body is built and checked here exactly as for a local run (so a bad field is refused before
anything is sent or charged), submitted with qwenserve's client, followed with a progress bar
(queue position, then denoising steps, with the server's ETA) and the image written. Ctrl-C
cancels the job on the server (refunded if it had not started). Needs no torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qwenserve.catalog import get_model, validate_request
from qwenserve.client import (
    AlreadyEnded,
    InferenceFailed,
    Job,
    QwenServeClient,
    QwenServeClientError,
    StatusUpdate,
)

EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130
POLL_INTERVAL_S = 0.5


def describe(update: StatusUpdate) -> str:
    """One line for the bar: where the job is, and the ETA when the server has one."""
    if update.status == "QUEUED":
        where = f"queued, {update.queue_position} ahead" if update.queue_position else "next"
    elif update.step is not None:
        where = "denoising"
    elif update.status == "PROCESSING":
        where = "waiting for its worker"
    else:
        where = update.status.lower()
    if update.cancel_requested:
        where += ", cancelling"
    if update.eta_s is not None and update.status in ("QUEUED", "PROCESSING"):
        where += f" (ETA {update.eta_s:.0f}s)"
    return where


def run_remote(args: argparse.Namespace, console: Console) -> int:
    """Run ``args`` on the server ``args.server``; returns the exit code."""
    from qwenserve.cli.run import build_body, check_out  # the local run's, so both agree

    spec = get_model(args.slug)
    body = build_body(spec, prompt=args.prompt, params=args.param, images=args.image, out=args.out)
    check_out(args.out, validate_request(spec.slug, body))
    try:
        with QwenServeClient(api_key=args.api_key, base_url=args.server) as client:
            return _follow(client, spec.slug, body, args.out, args.timeout, console)
    except httpx.TransportError as error:
        console.print(f"[red]cannot reach {args.server}:[/red] {error}")
        return EXIT_FAILED


def _follow(
    client: QwenServeClient,
    slug: str,
    body: dict[str, object],
    out: Path,
    timeout_s: float,
    console: Console,
) -> int:
    try:
        job = client.submit_async(slug, **body)
    except QwenServeClientError as error:
        console.print(f"[red]refused ({error.status}):[/red] {error.detail}")
        return EXIT_REFUSED if error.status is not None and error.status < 500 else EXIT_FAILED
    console.print(f"submitted [bold]{job.request_id}[/bold] to {client.endpoints.v2}")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"{slug}: submitted", total=None)

        def show(update: StatusUpdate) -> None:
            bar.update(
                task,
                description=f"{slug}: {describe(update)}",
                completed=update.step or 0,
                total=update.total_steps,
            )

        try:
            result = job.wait(timeout=timeout_s, interval=POLL_INTERVAL_S, on_progress=show)
        except KeyboardInterrupt:
            bar.stop()
            return _cancel(job, console)
        except InferenceFailed as error:
            console.print(f"[red]failed:[/red] {error.detail}")
            return EXIT_FAILED
    data = client.image(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    metrics = result.get("metrics", {})
    console.print(
        f"wrote [bold]{out}[/bold]: {result.get('width')}x{result.get('height')} "
        f"{result.get('content_type')}, {len(data)} bytes, seed {result.get('seed')}, "
        f"{metrics.get('inference_time', 0):.2f}s inference, "
        f"{metrics.get('queue_time', 0):.2f}s queued, ${metrics.get('cost', 0):.4f}"
    )
    return 0


def _cancel(job: Job, console: Console) -> int:
    """Ctrl-C: stop the job on the server too (nobody would take its image)."""
    try:
        answer = job.cancel()
    except AlreadyEnded as error:
        console.print(f"[yellow]interrupted; the request had already ended ({error.job_status})")
        return EXIT_INTERRUPTED
    if answer.get("status") == "FAILED":
        console.print(f"[yellow]cancelled {job.request_id}[/yellow] before it ran (refunded)")
    else:
        console.print(
            f"[yellow]cancelling {job.request_id}[/yellow]: it stops at its next step (refunded)"
        )
    return EXIT_INTERRUPTED
