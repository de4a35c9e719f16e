"""Can the denoiser draw one object when everything around it is right? Each object of a real test scene has its
image codes masked (those of the 4x4-pixel patches its bounding box, plus a 2-pixel margin, touches) and the model
redraws them from the scene's caption, the rest of the canvas given (MaskGIT inpainting). The checker then reads
that object from the decoded image. Against the tokenizer's own reconstruction (nothing masked: the ceiling), this
separates drawing one object's shape from laying out a whole scene; the arms differ in how many steps fill the
masked codes (1 = all at once).

    python benchmarks/inpaint_probe.py --model shapes-tiny --n 100 --steps 1 16 32 \\
        --out benchmarks/results/inpaint-probe/shipped
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from json_report import print_and_save  # noqa: E402

CHECKS = ("found", "shape", "color", "size", "position", "all_right")


def object_mask(obj: Any, grid: int, image_size: int = 64, margin: float = 2.0) -> torch.Tensor:
    """[grid * grid] bool: the codes whose patch the object's bounding box (widened by ``margin`` px) touches."""
    patch = image_size / grid
    half = obj.diameter / 2 + margin
    lo = [max(0, math.floor((c - half) / patch)) for c in (obj.cx, obj.cy)]
    hi = [min(grid - 1, math.floor((c + half) / patch)) for c in (obj.cx, obj.cy)]
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = True
    return mask.flatten()


def check_object(image: Any, scene: Any, index: int) -> dict[str, bool]:
    """The checker's reading of object ``index`` of ``scene`` in ``image`` (paired as the eval pairs objects)."""
    from mmdlm.eval.checkers import check_objects

    result = check_objects(image, scene)[index]
    return {c: result[c] for c in CHECKS}


@torch.no_grad()
def inpaint_objects(pipe: Any, samples: Sequence[Any], steps: int | None, batch_size: int = 32,
                    seed: int = 0, guidance_scale: float | None = None) -> list[dict[str, Any]]:
    """One row per object of each sample: its codes masked and redrawn in ``steps`` MaskGIT steps (``None``: the
    tokenizer's reconstruction, nothing redrawn) at ``guidance_scale`` (``None``: the model's generation config),
    then checked. Rows also carry the object's requested size and shape and its number of masked codes."""
    from mmdlm.sampling.maskgit import generate_image_tokens

    model, vq = pipe.model, pipe.model.image_tokenizer
    rows = [(s, j) for s in samples for j in range(len(s.scene.shapes))]
    out: list[dict[str, Any]] = []
    guidance = getattr(pipe.generation_config, "guidance_scale", 3.5) if guidance_scale is None else guidance_scale
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        real = vq.encode(vq.preprocess([s.image for s, _ in chunk]).to(pipe.device))  # [B, h, w]
        h, w = real.shape[-2:]
        codes = real.reshape(len(chunk), h * w).clone()
        masks = torch.stack([object_mask(s.scene.shapes[j], h, vq.config.image_size) for s, j in chunk])
        masks = masks.to(codes.device)
        if steps is not None:
            prompts = pipe.processor.build_t2i_prompt([s.caption for s, _ in chunk])
            codes = generate_image_tokens(model, prompts, h * w, steps=steps, guidance_scale=guidance,
                                          generator=generator, init_codes=codes.masked_fill(masks, -1))
        images = vq.to_pil(vq.decode(codes.view(-1, h, w)))
        for (s, j), image, m in zip(chunk, images, masks):
            obj = s.scene.shapes[j]
            out.append({**check_object(image, s.scene, j), "requested_size": obj.size, "requested_shape": obj.shape,
                        "codes": int(m.sum())})
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each check's rate over all objects and per requested size, with the counts."""
    def rates(sel: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(sel), **{c: (sum(r[c] for r in sel) / len(sel) if sel else None) for c in CHECKS}}

    by_size = {size: rates([r for r in rows if r["requested_size"] == size]) for size in ("small", "large")}
    return {"all": rates(rows), **by_size}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-tiny", help="bundled model name or saved mmdlm model folder")
    ap.add_argument("--split", default="test", choices=["train", "test", "compositional"],
                    help="Shapes split (default test); train with --scene-seed 0 gives scenes the recipes drew from")
    ap.add_argument("--scene-seed", type=int, default=None,
                    help="seed of the split's scenes (default: mmdlm eval's; a shapes source's seed, 0 by default, "
                    "for train scenes the model learned from)")
    ap.add_argument("--n", type=int, default=100, help="scenes of the split; every object of each is probed")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 16], help="MaskGIT steps per arm (default 1 16)")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance of the redraws (default: the model's generation config)")
    ap.add_argument("--batch-size", type=int, default=32, help="objects redrawn per call (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--out", default=None, help="folder for result.json")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or min(args.steps) < 1:
        ap.error("--n, --batch-size and every --steps must be at least 1")

    import mmdlm
    from mmdlm.data.shapes import ShapesWorld
    from mmdlm.eval.evaluate import EVAL_SEED

    pipe = mmdlm.load(args.model)
    if not getattr(pipe.model.config, "can_draw_images", False) or getattr(pipe.model.config, "is_causal", False):
        ap.error(f"{args.model} cannot inpaint: it needs an image tokenizer and a bidirectional denoiser")
    scene_seed = EVAL_SEED if args.scene_seed is None else args.scene_seed
    samples = list(ShapesWorld(args.split, args.n, scene_seed))
    arms: dict[str, Any] = {}
    for steps in [None, *args.steps]:
        start = time.perf_counter()
        rows = inpaint_objects(pipe, samples, steps, args.batch_size, args.seed, args.guidance_scale)
        name = "reconstruction" if steps is None else f"inpaint_{steps}_steps"
        arms[name] = {**summarize(rows), "seconds": round(time.perf_counter() - start, 1)}
    codes = [r["codes"] for r in rows]
    guidance = args.guidance_scale if args.guidance_scale is not None else pipe.generation_config.guidance_scale
    result = {"model": args.model, "split": args.split, "scene_seed": scene_seed, "scenes": args.n,
              "guidance_scale": guidance, "objects": len(rows),
              "masked_codes_per_object": {"mean": sum(codes) / len(codes), "max": max(codes)}, "arms": arms}
    print_and_save(result, str(Path(args.out) / "result.json") if args.out else None)


if __name__ == "__main__":
    main()
