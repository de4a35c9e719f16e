"""README.md stays true: its ```python blocks run, its `mmdlm ...` command lines exit 0, and the API names,
signatures, CLI flags and files it mentions exist.

Blocks preceded by ``<!-- readme-test: skip -->`` (servers, training runs, GPU checkpoints) are not executed, but
their Python still has to parse and their `mmdlm` lines still have to parse with the real argument parsers. Blocks
that use the bundled model are skipped, saying why, while mmdlm/weights/shapes-tiny is not installed.

Examples run offline in a scratch folder that mirrors the repository root (``mmdlm/`` and ``configs/`` are links), so
their relative paths work and the files they write (``triangle.png``) do not land in the checkout.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP_MARK = "<!-- readme-test: skip -->"
WEIGHTS_CONFIG = REPO / "mmdlm" / "weights" / "shapes-tiny" / "config.json"
NO_WEIGHTS = ("the bundled model mmdlm/weights/shapes-tiny is not installed yet (no config.json); this README "
              "example uses it and runs once the trained weights are there")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README: its language, code, 1-based line of the opening fence, skip mark."""

    lang: str
    code: str
    line: int
    skipped: bool

    @property
    def name(self) -> str:
        return f"{self.lang}@L{self.line}"


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block; ``skipped`` when the last non-blank line before the fence is the skip mark."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md: the code block opened at line {start + 1} is never closed")
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(m.group(1), "\n".join(body) + "\n", start + 1, before == SKIP_MARK))
        i += 1
    return blocks


def command_lines(block: Block) -> list[tuple[int, list[str]]]:
    """The `mmdlm ...` lines of a bash block as (README line number, argv without the leading "mmdlm")."""
    out = []
    for k, raw in enumerate(block.code.splitlines()):
        if raw.strip().startswith("mmdlm "):
            out.append((block.line + 1 + k, shlex.split(raw, comments=True)[1:]))
    return out


def needs_weights_python(code: str) -> bool:
    """True when a Python example loads the bundled model (by name, or ``mmdlm.load()`` with its default)."""
    return "shapes-tiny" in code or re.search(r"mmdlm\.load\(\s*\)", code) is not None


def needs_weights_cli(argv: list[str]) -> bool:
    """ask / caption / draw use the bundled model unless --model names another one."""
    uses_model = bool(argv) and argv[0] in ("ask", "caption", "draw")
    model = argv[argv.index("--model") + 1] if "--model" in argv[:-1] else "shapes-tiny"
    return uses_model and model == "shapes-tiny"


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.lang == "python"]
COMMANDS = [(b, line, argv) for b in BLOCKS if b.lang == "bash" for line, argv in command_lines(b)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    # Tiny models: extra threads only contend for the shared cores (as in conftest.py).
    env.setdefault("OMP_NUM_THREADS", os.environ.get("MMDLM_TEST_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder that looks like the repository root for relative paths."""
    work = tmp_path_factory.mktemp("readme") / "root"
    work.mkdir()
    for name in ("mmdlm", "configs"):
        (work / name).symlink_to(REPO / name, target_is_directory=True)
    return work


RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    blocks = json.load(open(sys.argv[1], encoding="utf-8"))
    results = {}
    for name, code in blocks:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                exec(compile(code, "README.md:" + name, "exec"), {"__name__": "__main__"})
            results[name] = {"ok": True, "output": out.getvalue()}
        except BaseException:
            results[name] = {"ok": False, "output": out.getvalue() + traceback.format_exc()}
    json.dump(results, open(sys.argv[2], "w", encoding="utf-8"))
""")


def _runnable_python(block: Block) -> bool:
    return not block.skipped and (WEIGHTS_CONFIG.is_file() or not needs_weights_python(block.code))


@pytest.fixture(scope="module")
def python_results(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Run every runnable Python block, each in fresh globals, in one interpreter (one import of torch)."""
    scratch = tmp_path_factory.mktemp("readme-runner")
    todo = [(b.name, b.code) for b in PYTHON if _runnable_python(b)]
    (scratch / "blocks.json").write_text(json.dumps(todo), encoding="utf-8")
    (scratch / "runner.py").write_text(RUNNER, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(scratch / "runner.py"), str(scratch / "blocks.json"),
                           str(scratch / "results.json")], cwd=workdir, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"the README example runner crashed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((scratch / "results.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- running


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_example_runs(block: Block, request: pytest.FixtureRequest) -> None:
    if block.skipped:
        pytest.skip(f"marked {SKIP_MARK} in README.md (needs a GPU checkpoint or a long run)")
    if not _runnable_python(block):
        pytest.skip(NO_WEIGHTS)
    result = request.getfixturevalue("python_results")[block.name]
    assert result["ok"], f"README.md python block at line {block.line} failed:\n{result['output']}"


@pytest.mark.parametrize("block,line,argv", COMMANDS, ids=[f"mmdlm-{a[0]}@L{n}" for _, n, a in COMMANDS])
def test_command_line_runs(block: Block, line: int, argv: list[str], workdir: Path) -> None:
    if block.skipped:
        pytest.skip(f"marked {SKIP_MARK} in README.md (a server, a training run or a long computation)")
    if needs_weights_cli(argv) and not WEIGHTS_CONFIG.is_file():
        pytest.skip(NO_WEIGHTS)
    script = Path(sys.executable).parent / "mmdlm"
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "mmdlm.cli"]
    proc = subprocess.run(launcher + argv, cwd=workdir, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"README.md line {line}: `mmdlm {shlex.join(argv)}` exited {proc.returncode}:\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if "--json" in argv:
        json.loads(proc.stdout)  # one JSON object, as the README promises
    if argv[0] == "draw":
        out = argv[argv.index("-o") + 1] if "-o" in argv else "out.png"
        assert (workdir / out).is_file(), f"`mmdlm draw` did not write {out}"


# ---------------------------------------------------------------------------------------------------- always checked


def test_readme_has_examples_that_run_without_weights() -> None:
    free = [b for b in PYTHON if not b.skipped and not needs_weights_python(b.code)]
    assert free, "README.md needs at least one Python example that runs without the bundled weights"
    assert any(not b.skipped and not needs_weights_cli(a) for b, _, a in COMMANDS)
    skipped = [b.name for b in BLOCKS if b.skipped]
    assert len(skipped) < len(BLOCKS) / 2, f"most README blocks are marked skip: {skipped}; keep that set small"


def test_skip_marks_sit_right_before_a_block() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    for i, text in enumerate(lines):
        if text.strip() == SKIP_MARK:
            following = next((t for t in lines[i + 1:] if t.strip()), "")
            assert following.startswith("```"), f"README.md line {i + 1}: {SKIP_MARK} is not followed by a code block"


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_example_parses(block: Block) -> None:
    ast.parse(block.code, filename=f"README.md:{block.line}")


def _parse_cli(argv: list[str]) -> None:
    """Parse README argv with the parser of the real subcommand (raises on an unknown flag or a missing argument)."""
    if argv[0] == "train":
        from mmdlm.training import build_parser

        build_parser().parse_args(argv[1:])
    elif argv[:2] == ["bench", "quality"]:
        from mmdlm.eval.sampler_quality import build_parser

        build_parser().parse_args(argv[2:])
    elif argv[0] == "bench":
        from mmdlm.bench import build_parser

        build_parser().parse_args(argv[1:])
    elif argv[0] == "eval":  # its parser lives inside main(): compare flags with its --help
        from mmdlm.eval.evaluate import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["--help"])
        unknown = [a for a in argv[1:] if a.startswith("--") and a not in out.getvalue()]
        assert not unknown, f"mmdlm eval has no {unknown}"
    else:
        from mmdlm.cli import build_parser

        build_parser().parse_args(argv)


@pytest.mark.parametrize("block,line,argv", COMMANDS, ids=[f"mmdlm-{a[0]}@L{n}" for _, n, a in COMMANDS])
def test_command_line_parses(block: Block, line: int, argv: list[str]) -> None:
    if argv == ["--help"] or argv[1:] == ["--help"]:
        return  # --help exits by design; test_command_line_runs runs it
    _parse_cli(argv)


def test_mentioned_files_exist() -> None:
    text = README.read_text(encoding="utf-8")
    paths = set(re.findall(r"(?<![\w/.])((?:mmdlm|configs|tests|benchmarks)/[\w./-]*\w)", text))
    assert "mmdlm/demo/examples/shapes_0.png" in paths
    missing = sorted(p for p in paths if not (REPO / p).exists() and "*" not in p
                     and not p.startswith("mmdlm/weights/"))  # the trained weights are added separately
    assert not missing, f"README.md mentions paths that do not exist: {missing}"

def test_cli_questions_match_the_example_manifest() -> None:
    """`mmdlm ask` lines ask each bundled image the question its manifest entry (examples.json) has an answer to."""
    manifest = json.loads((REPO / "mmdlm/demo/examples/examples.json").read_text(encoding="utf-8"))
    questions = {ex["image"]: ex["question"] for ex in manifest["examples"]}
    asks = [(line, argv) for _, line, argv in COMMANDS if argv[0] == "ask" and Path(argv[1]).name in questions]
    assert asks, "README.md should show `mmdlm ask` on a bundled example image"
    for line, argv in asks:
        assert argv[2] == questions[Path(argv[1]).name], f"README.md line {line}: no reference answer for {argv[2]!r}"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_api_names_and_signatures_match_the_code() -> None:
    """Every `mmdlm.x.y` the README names exists; a written-out call's parameter names exist, and a complete
    signature (every parameter listed) has the code's defaults."""
    text = README.read_text(encoding="utf-8").replace("\n", " ")
    names = set(re.findall(r"`(mmdlm(?:\.[A-Za-z_]\w*)+)", text))
    assert "mmdlm.sampling.llada.generate" in names
    for dotted in sorted(names):
        _resolve(dotted)
    checked = 0
    for dotted, args in re.findall(r"`(mmdlm(?:\.[A-Za-z_]\w*)+)\(([^`]*)\)`", text):
        sig = inspect.signature(_resolve(dotted))
        params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        listed: dict[str, str | None] = {}
        for item in (a.strip() for a in args.split(",")):
            if item in ("", "*") or item.startswith("**"):
                continue
            name, _, default = item.partition("=")
            if name.strip().isidentifier():
                listed[name.strip()] = default.strip() or None
        unknown = [n for n in listed if n not in params and not has_var_kw]
        assert not unknown, f"README: {dotted}() has no parameter(s) {unknown}; its signature is {sig}"
        if set(listed) == set(params):
            checked += 1
            for n, written in listed.items():
                actual = params[n].default
                if written is not None and actual is not inspect.Parameter.empty:
                    assert ast.literal_eval(written) == actual, f"README: {dotted}({n}={written}) but the code has {actual!r}"
    assert checked >= 3, "README.md should spell out the full signatures of the samplers"


def test_code_layout_lists_real_modules() -> None:
    """Every entry of the README's code-layout tree is a file or folder of the package."""
    trees = [b for b in BLOCKS if b.lang == "" and b.code.startswith("mmdlm/\n")]
    assert len(trees) == 1, "README.md should have one code-layout block starting with 'mmdlm/'"
    entries = [line.split()[0] for line in trees[0].code.splitlines()[1:] if line.strip()]
    assert len(entries) >= 10
    missing = [e for e in entries if not (REPO / "mmdlm" / e).exists()]
    assert not missing, f"README.md's code layout lists {missing}, which are not in mmdlm/"
