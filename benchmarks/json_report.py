"""What the diagnostic scripts of benchmarks/ share: print a result as JSON (and save it when asked), their Shapes
arguments, the images they tally and figure saving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence


def print_and_save(result: dict[str, Any], out: Optional[str], indent: int = 2) -> None:
    """Print ``result`` as JSON; also write it to ``out`` (its folder created) when ``out`` is given."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def add_shapes_arguments(ap: Any, n_help: str) -> None:
    """The arguments every Shapes drawing diagnostic takes: ``--model``, ``--split`` and ``--n``."""
    ap.add_argument("--model", default="shapes-tiny", help="bundled model name or saved mmdlm model folder")
    ap.add_argument("--split", default="test", choices=["test", "compositional"], help="Shapes split (default test)")
    ap.add_argument("--n", type=int, default=100, help=n_help)


def scene_images(model: str, samples: Sequence[Any], batch_size: int, first_seed: int, reconstructions: bool,
                 **load_kwargs: Any) -> list[Any]:
    """The images a Shapes diagnostic tallies: ``model``'s drawings of the samples' captions (``batch_size`` a call,
    sampling seeds ``first_seed``, ``first_seed + 1``, ...), or with ``reconstructions`` its image tokenizer's
    reconstructions of the real images. ``load_kwargs`` go to ``mmdlm.load``."""
    if reconstructions:
        from mmdlm.eval.reconstruction import load_image_tokenizer, reconstruct

        return reconstruct(load_image_tokenizer(model), [s.image for s in samples], batch_size)
    import mmdlm

    pipe = mmdlm.load(model, **load_kwargs)
    images: list[Any] = []
    for b, first in enumerate(range(0, len(samples), batch_size)):
        chunk = samples[first:first + batch_size]
        images += pipe.generate_image([s.caption for s in chunk], seed=first_seed + b)
    return images


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
