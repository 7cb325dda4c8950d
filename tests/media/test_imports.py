"""The API process imports the media layer, so it must not pull in torch or diffusers."""

from __future__ import annotations

import subprocess
import sys


def test_media_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import qwenserve.media.encode, qwenserve.media.fetch, qwenserve.media.inputs\n"
        "import qwenserve.media.lora, qwenserve.media.storage\n"
        "heavy = ('torch', 'diffusers', 'safetensors.torch')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
