"""The content policy's image checks in a real worker runner on a real SQLite store, with the
classifier plugged in by name as an operator would (``tests/policy_classifiers.py``): a flagged
output fails its job as ``content_policy``, is never stored and is refunded (or charged when
configured); in a batch only the flagged job fails; a flagged edit input fails before compute."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from qwenserve.catalog import GenerationRequest, validate_request
from qwenserve.cli.compose import screens
from qwenserve.config import Settings
from qwenserve.jobs import JobStatus
from qwenserve.media.storage import LocalMediaStore
from qwenserve.policy import INPUT_BLOCKED, OUTPUT_BLOCKED
from qwenserve.store.sqlite import SqliteStore
from qwenserve.worker.config import WorkerConfig
from qwenserve.worker.inputs import InputLoader
from qwenserve.worker.runner import WorkerRunner
from qwenserve.worker.screening import ScreenedInputLoader
from tests.service.helpers import png_b64
from tests.service.test_worker import Clock, NoInputs, SolidEngine, balance, enqueue, submit

RED = 230  # SolidEngine paints the seed into the red channel: seed 230 scores 0.9
DARK = 7  # scores 0.03


def policy_settings(tmp_path: Path, mode: str = "prompt+output", **more: object) -> Settings:
    terms = tmp_path / "terms.txt"
    terms.write_text("", encoding="utf-8")
    return Settings(
        data_dir=tmp_path,
        content_policy=mode,  # type: ignore[arg-type]
        blocked_terms_file=terms,
        nsfw_classifier="tests.policy_classifiers:RedClassifier",
        **more,  # type: ignore[arg-type]
    )


def screened_runner(
    settings: Settings,
    store: SqliteStore,
    media: LocalMediaStore,
    engine: SolidEngine,
    clock: Clock,
    inputs: InputLoader | None = None,
) -> WorkerRunner:
    output_screen, input_check = screens(settings)
    loader = inputs or NoInputs()
    if input_check is not None:
        loader = ScreenedInputLoader(loader, input_check)
    return WorkerRunner(
        store=store,
        media=media,
        engine=engine,
        inputs=loader,
        config=WorkerConfig(worker_id="w1", max_batch=4, prefetch=False, poll_interval_s=0.01),
        clock=clock,
        output_screen=output_screen,
    )


def media_files(media: LocalMediaStore) -> list[str]:
    """The media ids on disk (each is a data file and its metadata)."""
    return sorted({p.stem for p in media.root.rglob("*") if p.is_file()})


def test_a_flagged_output_fails_unstored_and_refunded(
    tmp_path: Path, store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock, seed=RED)
    done: list[str] = []
    worker = screened_runner(policy_settings(tmp_path), store, media, SolidEngine(), clock)
    worker.on_job_done = done.append
    assert worker.run_once()
    worker.wait_finished()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.FAILED
    assert (stored.error_kind, stored.error) == ("content_policy", OUTPUT_BLOCKED)
    assert stored.result is None
    assert media_files(media) == [], "a blocked image never reaches the media store"
    assert balance(store, key_id) == pytest.approx(1.0)
    assert done == [job.id], "its waiters are woken like for any ending"


def test_in_a_batch_only_the_flagged_job_fails(
    tmp_path: Path, store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    flagged = submit(store, key_id, clock, seed=RED)
    clean = submit(store, key_id, clock, seed=DARK)
    engine = SolidEngine()
    worker = screened_runner(policy_settings(tmp_path), store, media, engine, clock)
    assert worker.run_once()
    worker.wait_finished()
    assert engine.batch_sizes == [2], "both ran in one pipeline call"
    blocked = store.get_job(flagged.id, now=clock())
    completed = store.get_job(clean.id, now=clock())
    assert blocked is not None and blocked.error_kind == "content_policy"
    assert completed is not None and completed.status is JobStatus.COMPLETED
    assert completed.result is not None
    assert media.get(completed.result.media_id, now=clock()) is not None
    assert media_files(media) == [completed.result.media_id]
    assert balance(store, key_id) == pytest.approx(0.9), "only the completed job is paid"


def test_blocked_outputs_can_be_charged(
    tmp_path: Path, store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock, seed=RED)
    settings = policy_settings(tmp_path, charge_blocked_outputs=True)
    worker = screened_runner(settings, store, media, SolidEngine(), clock)
    worker.run_once()
    worker.wait_finished()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.error_kind == "content_policy"
    assert balance(store, key_id) == pytest.approx(0.9)
    assert media_files(media) == []


def test_outputs_pass_when_only_prompts_are_checked(
    tmp_path: Path, store: SqliteStore, media: LocalMediaStore, clock: Clock, key_id: str
) -> None:
    job = submit(store, key_id, clock, seed=RED)
    settings = policy_settings(tmp_path, mode="prompt")
    worker = screened_runner(settings, store, media, SolidEngine(), clock)
    worker.run_once()
    worker.wait_finished()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None and stored.status is JobStatus.COMPLETED


class SolidInputs(NoInputs):
    """Each input image is a solid colour of the given red."""

    def __init__(self, red: int) -> None:
        self.red = red

    def load_images(self, request: GenerationRequest) -> list[Image.Image]:
        return [Image.new("RGB", (16, 16), (self.red, 0, 0)) for _ in request.images]


@pytest.mark.parametrize(
    ("red", "mode", "blocked"),
    [(RED, "all", True), (DARK, "all", False), (RED, "prompt+output", False)],
)
def test_edit_inputs_are_checked_before_compute_with_all(
    tmp_path: Path,
    store: SqliteStore,
    media: LocalMediaStore,
    clock: Clock,
    key_id: str,
    red: int,
    mode: str,
    blocked: bool,
) -> None:
    request = validate_request(
        "qwen-image-edit-fast", {"prompt": "x", "image": png_b64(), "seed": DARK, "steps": 2}
    )
    job = enqueue(store, request, "edit-1", key_id, clock)
    engine = SolidEngine()
    worker = screened_runner(
        policy_settings(tmp_path, mode=mode), store, media, engine, clock, SolidInputs(red)
    )
    worker.run_once()
    worker.wait_finished()
    stored = store.get_job(job.id, now=clock())
    assert stored is not None
    if blocked:
        assert (stored.error_kind, stored.error) == ("content_policy", INPUT_BLOCKED)
        assert engine.calls == 0, "refused before any compute"
        assert balance(store, key_id) == pytest.approx(1.0)
    else:
        assert stored.status is JobStatus.COMPLETED
