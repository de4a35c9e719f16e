"""Data flows one way: data -> vision -> core -> sampling -> pipeline -> demo/CLI. Lower layers never import higher ones."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mmdlm"

# For each lower layer, the mmdlm modules it must never import.
FORBIDDEN = {
    "data": ["mmdlm.vision", "mmdlm.modeling_mmdlm", "mmdlm.sampling", "mmdlm.training", "mmdlm.pipeline", "mmdlm.cli", "mmdlm.demo", "mmdlm.eval"],
    "vision": ["mmdlm.data", "mmdlm.modeling_mmdlm", "mmdlm.sampling", "mmdlm.training", "mmdlm.pipeline", "mmdlm.cli", "mmdlm.demo", "mmdlm.eval"],
    "sampling": ["mmdlm.training", "mmdlm.pipeline", "mmdlm.cli", "mmdlm.demo", "mmdlm.eval"],
}


def imported_modules(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # resolve relative imports against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
            elif node.module:
                out.add(node.module)
    return out


def test_lower_layers_never_import_higher_ones():
    problems = []
    for layer, banned in FORBIDDEN.items():
        for path in (PKG / layer).rglob("*.py"):
            for mod in imported_modules(path, f"mmdlm.{layer}"):
                if any(mod == b or mod.startswith(b + ".") for b in banned):
                    problems.append(f"{path.relative_to(PKG.parent)} imports {mod}")
    assert not problems, "\n".join(problems)


def test_resolver_sees_relative_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from ..pipeline import X\nfrom . import y\n")
    mods = imported_modules(f, "mmdlm.sampling")
    assert "mmdlm.pipeline" in mods and "mmdlm.sampling.y" in mods
