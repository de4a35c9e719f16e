"""Does a model read the image? Its masked-diffusion loss on Shapes understanding rows with the right images, with
the images shuffled across rows, and with blank (zero) pixels. Equal real/shuffled losses mean the image is ignored.

    python benchmarks/image_reliance.py mmdlm/weights/shapes-tiny
"""

from __future__ import annotations

import argparse

import torch

from mmdlm import diffusion
from mmdlm.data.shapes import shapes_examples
from mmdlm.modeling_mmdlm import MMDLMForConditionalGeneration
from mmdlm.processing import MMDLMProcessor
from mmdlm.training.collators import MultiTaskCollator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a local mmdlm model folder")
    parser.add_argument("--rows", type=int, default=64, help="understanding rows per split")
    parser.add_argument("--seeds", type=int, default=4, help="masking draws averaged per variant")
    args = parser.parse_args()
    model = MMDLMForConditionalGeneration.from_pretrained(args.model, local_files_only=True).float().eval()
    processor = MMDLMProcessor.from_pretrained(args.model)
    collator = MultiTaskCollator(processor, max_length=512, config=model.config, min_answer_length=32)
    torch.manual_seed(0)
    for split in ("train", "test"):
        rows = shapes_examples(split, args.rows, tasks=("caption", "vqa"))[: args.rows]
        batch = collator(rows)
        pixels = batch["pixel_values"]
        for name, pv in (("real", pixels), ("shuffled", pixels[torch.randperm(len(rows))]),
                         ("zero", torch.zeros_like(pixels))):
            with torch.no_grad():
                losses = [float(diffusion.compute_batch_loss(model, dict(batch, pixel_values=pv),
                                                             generator=torch.Generator().manual_seed(s))["understanding"])
                          for s in range(args.seeds)]
            print(f"{split:5s} {name:8s} understanding loss {sum(losses) / len(losses):.4f}")


if __name__ == "__main__":
    main()
