"""How much can be read from a saved model's vision tower? A diagnostic of the frozen features, not a model.

Two probes trained on the tower's slot features alone (no denoiser): the per-slot MLP of
``benchmarks/slot_reader_probe.py`` (colour and shape of the object in each slot's cell, Shapes scenes), and a linear
classifier of the held-out handwritten digits (trained on the 1 500 train digits, scored on the 297 test ones), with
scikit-learn's SVM on the raw 8x8 scans as a reference for how hard that split is. A denoiser reading this tower
through its projector should not be expected to beat these numbers by much.

    python benchmarks/tower_probe.py --model shapes-tiny --out benchmarks/results/recipe-sweep/round8/tower-probe-shipped.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import mmdlm
from mmdlm.data.digits import load_digit_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from json_report import print_and_save  # noqa: E402
from slot_reader_probe import encode_scenes, slot_probe  # noqa: E402


def digit_features(model: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen tower features [n, slots * width] of one digits split and the labels."""
    pipe = mmdlm.load(model, device="cpu")
    tower, processor = pipe.model.model.vision_tower.eval(), pipe.processor.image_processor
    data = load_digit_images(split)
    with torch.no_grad():
        feats = tower(processor([image for image, _ in data])["pixel_values"]).float()
    return feats.flatten(1), torch.tensor([label for _, label in data])


def linear_probe_predictions(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, steps: int = 2000,
                             seed: int = 0) -> torch.Tensor:
    """Test-set classes predicted by a linear classifier (AdamW on standardised features) trained on (x, y)."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    x, x_test = (x - mean) / std, (x_test - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.AdamW(probe.parameters(), 1e-3, weight_decay=0.01)
    for _ in tqdm(range(steps), desc="linear probe", unit="step"):
        idx = torch.randint(len(x), (128,))
        loss = F.cross_entropy(probe(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return probe(x_test).argmax(-1)


def linear_probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, steps: int = 2000,
                 seed: int = 0) -> float:
    """Test accuracy of :func:`linear_probe_predictions`."""
    return float((linear_probe_predictions(x, y, x_test, steps, seed) == y_test).float().mean())


def digit_probe(model: str) -> float:
    """The linear probe on a model's tower features of the train digits, scored on the held-out ones."""
    return linear_probe(*digit_features(model, "train"), *digit_features(model, "test"))


def raw_pixel_svm() -> float:
    """scikit-learn's SVC on the raw 8x8 scans of the same split: how hard the held-out digits are."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    scans, labels = load_digits(return_X_y=True)  # the 0..16 ink values the usual gamma is tuned for
    svm = SVC(gamma=0.001, C=10).fit(scans[:1500], labels[:1500])
    return float((svm.predict(scans[1500:]) == labels[1500:]).mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-tiny", help="bundled model name or saved mmdlm model folder")
    ap.add_argument("--train-scenes", type=int, default=12000)
    ap.add_argument("--test-scenes", type=int, default=1000)
    ap.add_argument("--out", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    slots = slot_probe(encode_scenes(args.model, "train", args.train_scenes),
                       encode_scenes(args.model, "test", args.test_scenes))
    result = {"model": args.model, "slot_probe": slots, "digit_linear_probe": digit_probe(args.model),
              "digit_raw_pixel_svm": raw_pixel_svm()}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
