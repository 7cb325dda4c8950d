"""The real engine (tiny preset) in its child process: the image, the previews and an edit's
input image cross the boundary unchanged (equal, pixel for pixel, to the same engine's in this
process), and the parent that drives it never imports torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from qwenserve.runtime import Engine, EngineConfig
from tests.runtime.conftest import make_request, noise_image, png_base64

# Run as the parent: a fresh interpreter with only the worker's side imported.
PARENT = """
import dataclasses, json, sys
from functools import partial
from pathlib import Path
import numpy as np
from qwenserve.catalog import validate_request
from qwenserve.runtime.config import EngineConfig
from qwenserve.runtime.batch_keys import batch_key
from qwenserve.worker.engine_child import EngineSpec
from qwenserve.worker.engine_process import EngineProcess

if __name__ == "__main__":
    out = Path(sys.argv[1])
    config = EngineConfig(weights="tiny", cache_dir=Path(sys.argv[2]))
    engine = EngineProcess(
        EngineSpec("qwenserve.runtime:Engine", config), batch_key=partial(batch_key, config=config)
    ).start()
    request = dataclasses.replace(
        validate_request("qwen-image-fast", {"prompt": "a red fox", "steps": 4, "seed": 11}),
        partial_images=2, preview_id="p" * 12,
    )
    previews = []
    result = engine.generate(request, on_preview=lambda row, k, image: previews.append(image))
    np.save(out / "image.npy", np.asarray(result.image))
    for k, image in enumerate(previews):
        np.save(out / f"preview{k}.npy", np.asarray(image))
    edit = validate_request("qwen-image-edit-fast", json.loads((out / "edit.json").read_text()))
    from PIL import Image
    edited = engine.generate(edit, images=[Image.open(out / "input.png").convert("RGB")])
    np.save(out / "edit.npy", np.asarray(edited.image))
    from qwenserve.catalog import get_model
    tokens = engine.count_tokens(get_model("qwen-image-edit-fast").recipe, "make it red")
    engine.close()
    heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
    print(json.dumps({"heavy": heavy, "previews": len(previews), "tokens": tokens}))
"""


def test_the_child_makes_the_in_process_engines_pixels_and_the_parent_has_no_torch(
    tmp_path: Path, shared_cache: Path
) -> None:
    source = noise_image(96, 64, seed=4)
    source.save(tmp_path / "input.png")
    edit_body = {"prompt": "make it red", "image": png_base64(source), "steps": 2, "seed": 3}
    (tmp_path / "edit.json").write_text(json.dumps(edit_body))
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(shared_cache)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []  # the parent drove the engine without importing torch
    assert report["previews"] == 2
    assert isinstance(report["tokens"], int) and report["tokens"] > 0  # counted by the child

    engine = Engine(EngineConfig(weights="tiny", cache_dir=shared_cache))
    request = dataclasses.replace(
        make_request("qwen-image-fast", prompt="a red fox", steps=4, seed=11),
        partial_images=2,
        preview_id="p" * 12,
    )
    previews: list[Image.Image] = []
    local = engine.generate(request, on_preview=lambda _row, _k, image: previews.append(image))
    assert np.array_equal(np.load(tmp_path / "image.npy"), np.asarray(local.image))
    assert len(previews) == 2
    for k, image in enumerate(previews):
        assert np.array_equal(np.load(tmp_path / f"preview{k}.npy"), np.asarray(image))
    edit = engine.generate(
        make_request("qwen-image-edit-fast", **edit_body),
        images=[Image.open(tmp_path / "input.png").convert("RGB")],
    )
    assert np.array_equal(np.load(tmp_path / "edit.npy"), np.asarray(edit.image))
