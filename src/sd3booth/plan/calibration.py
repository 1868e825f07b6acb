"""The measured coefficients the planner predicts with (calibration.json, fitted by ``sd3booth bench``)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

# ---- calibration -----------------------------------------------------------------------------------------


def load_calibration(path: Path | None = None) -> dict[str, Any]:
    if path is None:
        text = (resources.files("sd3booth.plan") / "calibration.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return json.loads(text)
