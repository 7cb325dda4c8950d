"""`qwenserve run`: a real subprocess for the happy path, the entry point in-process otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qwenserve.cli.main import main
from tests.runtime.conftest import noise_image


@pytest.fixture
def cli_env(shared_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"QWENSERVE_CACHE_DIR": str(shared_cache), "QWENSERVE_DATA_DIR": str(tmp_path / "d")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


def test_run_writes_a_png_of_the_right_size(cli_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "a.png"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "qwenserve.cli.main", "run", "qwen-image-fast"),
            *("--prompt", "a lighthouse", "--param", "seed=42", "--param", "steps=2"),
            *("--out", str(out)),
        ],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (256, 256)  # 1:1 on the tiny preset
    assert "seed 42" in done.stderr
    assert "images are noise" in done.stderr
    assert str(out) in done.stderr.replace("\n", "")


def test_run_edit_with_a_local_image(
    cli_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.png"
    noise_image(300, 150).save(source)
    out = tmp_path / "edited.webp"
    code = main(
        [
            *("run", "qwen-image-edit-fast", "--prompt", "make it blue"),
            *("--image", str(source), "--param", "steps=1", "--out", str(out)),
        ]
    )
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.format == "WEBP"  # from the --out suffix: image_format was not given
        assert abs(image.width / image.height - 2.0) < 0.15  # matches the 2:1 input


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["qwen-image-2512", "--prompt", "x", "--param", "width=100"], "width"),
        (["qwen-image-fast", "--prompt", "x", "--param", "colour=red"], "colour"),
        (["qwen-image-edit-fast", "--prompt", "x", "--image", "/no/such/file.png"], "image"),
        (["qwen-image", "--param", "steps=4"], "prompt"),
    ],
)
def test_invalid_input_exits_2_naming_the_field(
    cli_env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    field: str,
) -> None:
    code = main(["run", *args, "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "out", "says"),
    [
        (["qwen-image-fast", "--prompt", "x"], "x.gif", "cannot write .gif files"),
        (["qwen-image-fast", "--prompt", "x", "--param", "image_format=png"], "x.jpg", "not jpeg"),
        (["no-such-model", "--prompt", "x"], "x.png", "not found"),
    ],
)
def test_an_unwritable_out_or_unknown_model_exits_2_before_any_work(
    cli_env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    out: str,
    says: str,
) -> None:
    import qwenserve.runtime

    def no_engine(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an engine was built for a request refused up front")

    monkeypatch.setattr(qwenserve.runtime, "Engine", no_engine)
    code = main(["run", *args, "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and err.count("\n") == 1  # one line, however long its path
    assert not (tmp_path / out).exists()


def test_run_builds_its_engine_with_every_served_switch(tmp_path: Path) -> None:
    """`qwenserve run` and the served workers share one EngineConfig builder: a switch set for
    one (tiling, offload, fp8, CFG pairing, ...) is never silently dropped by the other."""
    import dataclasses

    from qwenserve.cli.compose import engine_config
    from qwenserve.config import Settings

    settings = Settings(
        data_dir=tmp_path,
        vae_tiling=True,
        fuse_lightning=True,
        step_cache=0.2,
        prompt_cache_size=7,
        cfg_batch=False,
        resident_models=3,
    )
    served = engine_config(settings)
    for_run = engine_config(settings, resident_models=1)
    assert dataclasses.replace(served, resident_models=1) == for_run
    assert (served.vae_tiling, served.fuse_lightning, served.step_cache) == (True, True, 0.2)
    assert (served.prompt_cache_size, served.cfg_batch, served.resident_models) == (7, False, 3)
    assert {f.name for f in dataclasses.fields(served)} <= set(Settings.model_fields) | {
        "cache_dir"
    }, "every engine field has a setting"
