"""The ``mmdlm`` command: ask / caption / draw with a model, run the demo, and reach train / eval / bench."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable, Sequence

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

# Subcommands implemented elsewhere: the first of these modules with a ``main(argv)`` runs them.
DELEGATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train a model from a recipe (see `mmdlm train --help`)",
              ("mmdlm.training", "mmdlm.training.cli", "mmdlm.training.train", "mmdlm.training.trainer")),
    "eval": ("evaluate a model and print the evaluation table (see `mmdlm eval --help`)",
             ("mmdlm.eval", "mmdlm.eval.cli", "mmdlm.eval.evaluate", "mmdlm.eval.run")),
    "bench": ("benchmark the samplers' speed (see `mmdlm bench --help`)",
              ("mmdlm.bench", "benchmarks", "benchmarks.bench", "mmdlm.benchmarks")),
}

EPILOG = """examples:
  mmdlm ask shapes.png "what color is the circle?"
  mmdlm caption shapes.png --json
  mmdlm draw "a large red circle at the center." -o circle.png --seed 0
  mmdlm demo --port 7860
  mmdlm train --help

The default model is the bundled "shapes-tiny"; pass --model PATH for a local folder
(mmdlm, LLaDA, LLaDA-V or MMaDA layout). Exit codes: 0 ok, 1 runtime failure, 2 bad input."""


class UsageError(Exception):
    """Bad command-line input: reported on one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="shapes-tiny", metavar="NAME_OR_PATH",
                   help="bundled model name or local model folder (default: shapes-tiny)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the checkpoint's)")
    g.add_argument("--json", action="store_true", help="print one JSON object (result + statistics) for scripts")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the model's generation config)")
    g.add_argument("--sampler", choices=["fast", "llada"], default=None,
                   help="'fast' (caches + parallel commits) or 'llada' (reference)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps over the whole answer")
    g.add_argument("--gen-length", type=int, default=None, help="answer length in tokens")
    g.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block length (must divide --gen-length)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--threshold", type=float, default=None,
                   help="confidence above which tokens are committed in parallel (fast sampler)")
    g.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (0 = off)")
    g.add_argument("--remasking", choices=["low_confidence", "random"], default=None, help="which tokens to commit")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mmdlm`` (subcommands ask, caption, draw, demo, train, eval, bench)."""
    parser = _Parser(
        prog="mmdlm",
        description="Multimodal masked-diffusion language models: ask about images, caption them, draw them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mmdlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("ask", help="answer a question about an image",
                       description="Answer a question about an image with diffusion decoding.",
                       epilog='examples:\n  mmdlm ask shapes.png "how many shapes are there?"\n'
                              '  mmdlm ask shapes.png "where is the red circle?" --steps 8 --json',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file (PNG, JPEG, WebP, ...)")
    p.add_argument("question", help="the question, in quotes")
    _add_model_args(p)
    _add_sampling_args(p)

    p = sub.add_parser("caption", help="describe one or more images",
                       description="Describe each image (one line per image, or a JSON object with --json).",
                       epilog="examples:\n  mmdlm caption shapes.png\n  mmdlm caption a.png b.png --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")
    _add_model_args(p)
    _add_sampling_args(p)

    p = sub.add_parser("draw", help="draw an image from a text prompt",
                       description="Draw an image from a text prompt with MaskGIT-style decoding of image tokens.",
                       epilog='examples:\n  mmdlm draw "a small blue square at the top left." -o square.png\n'
                              '  mmdlm draw "a large red circle at the center." -o c.png --seed 1 --image-steps 24\n'
                              '  mmdlm draw "a small green square at the top." -o s.png --candidates 8',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="what to draw, in quotes")
    p.add_argument("-o", "--output", default="out.png", help="where to save the PNG (default: out.png)")
    p.add_argument("--image-steps", type=int, default=None, help="decoding steps (default: model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: model's)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the image codes (default 1.0; 0 = argmax, the same image every time)")
    p.add_argument("--seed", type=int, default=None, help="random seed for a reproducible image")
    p.add_argument("--candidates", type=int, default=None,
                   help="draw N images and keep the one the model itself reads back best as the prompt (N times "
                        "slower; default: the model's image_candidates, 1)")
    _add_model_args(p)

    p = sub.add_parser("demo", help="run the local web demo (Gradio)",
                       description="Serve the web demo: multimodal chat, captioning and drawing with live "
                                   "denoising. Binds 127.0.0.1 unless --host says otherwise; makes no outbound "
                                   "connections.",
                       epilog="examples:\n  mmdlm demo\n  mmdlm demo --model runs/my-model --port 8000",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-tiny", metavar="NAME_OR_PATH", help="model (default: shapes-tiny)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")

    for name, (help_text, _) in DELEGATES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("sampler", "steps", "gen_length", "block_length", "temperature", "threshold", "cfg_scale", "remasking")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _load(args: argparse.Namespace):
    from .pipeline import MMDLMPipeline

    return MMDLMPipeline.from_pretrained(args.model, device=args.device, dtype=getattr(args, "dtype", None))


def _check_files(paths: Sequence[str]) -> None:
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"image file {path!r} does not exist")
        if os.path.isdir(path):
            raise UsageError(f"{path!r} is a directory, not an image file")


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    print(json.dumps(result, ensure_ascii=False) if args.json else text)


def _cmd_ask(args: argparse.Namespace) -> int:
    _check_files([args.image])
    pipe = _load(args)
    answer = pipe.answer(args.image, args.question, **_sampling_kwargs(args))
    stats = pipe.last_stats.to_dict() if pipe.last_stats else None
    _emit(args, {"image": args.image, "question": args.question, "answer": answer, "stats": stats}, answer)
    return EXIT_OK


def _cmd_caption(args: argparse.Namespace) -> int:
    _check_files(args.images)
    pipe = _load(args)
    captions = pipe.caption(list(args.images), **_sampling_kwargs(args))
    stats = pipe.last_stats.to_dict() if pipe.last_stats else None
    results = [{"image": i, "caption": c} for i, c in zip(args.images, captions)]
    text = captions[0] if len(captions) == 1 else "\n".join(f"{i}: {c}" for i, c in zip(args.images, captions))
    _emit(args, {"captions": results, "stats": stats}, text)
    return EXIT_OK


def _cmd_draw(args: argparse.Namespace) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f"cannot write {args.output!r}: folder {out_dir!r} does not exist")
    pipe = _load(args)
    image = pipe.generate_image(args.prompt, steps=args.image_steps, guidance_scale=args.guidance_scale, seed=args.seed,
                                temperature=args.temperature, candidates=args.candidates)
    image.save(args.output)
    stats = pipe.last_stats.to_dict() if pipe.last_stats else None
    result = {"prompt": args.prompt, "output": args.output, "size": list(image.size), "stats": stats}
    if pipe.last_image_scores:  # candidates: the reading score of each drawing, the kept one the highest
        result["candidate_scores"] = pipe.last_image_scores[0]
    _emit(args, result, f"saved {args.output}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.app import launch

    launch(model=args.model, host=args.host, port=args.port, device=args.device)
    return EXIT_OK


def _delegate(name: str, argv: list[str]) -> int:
    """Run another part of mmdlm's ``main(argv)``; its own parser handles --help and errors."""
    _, candidates = DELEGATES[name]
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue  # this candidate does not exist; try the next
            raise
        main_fn = getattr(module, "main", None)
        if callable(main_fn):
            code = main_fn(argv)
            return int(code) if isinstance(code, int) else EXIT_OK
    raise RuntimeError(f"`mmdlm {name}` is not available in this installation (none of {', '.join(candidates)} "
                       "provides main(argv))")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ask": _cmd_ask, "caption": _cmd_caption, "draw": _cmd_draw, "demo": _cmd_demo,
}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmdlm`` command; returns the exit code (0 ok, 1 runtime failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        if argv and argv[0] in DELEGATES:
            return _delegate(argv[0], argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except SystemExit as e:  # --help / --version, or a delegate's own parser
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print("mmdlm: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        print(f"mmdlm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 — the CLI reports failures on one line, without a traceback
        print(f"mmdlm: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        if os.environ.get("MMDLM_DEBUG"):
            raise
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
