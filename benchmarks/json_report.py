"""What the diagnostic scripts of benchmarks/ share: print a result as JSON and, when asked, save it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def print_and_save(result: dict[str, Any], out: Optional[str], indent: int = 2) -> None:
    """Print ``result`` as JSON; also write it to ``out`` (its folder created) when ``out`` is given."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
