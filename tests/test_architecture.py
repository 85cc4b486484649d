"""The import rules of ARCHITECTURE.md: each layer imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ddk_cache"
BASE = {"errors", "config", "runtime", "table", "tokenbytes", "__version__"}


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports (relative or absolute), as dotted names below ddk_cache."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = rel if path.name == "__init__.py" else rel[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            if node.module:
                out.add(".".join(base + [node.module]))
            else:
                out.update(".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddk_cache"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ddk_cache"))
    return {m.removeprefix("ddk_cache.").removeprefix("ddk_cache") or "__init__" for m in out}


def allowed(module: str, target: str) -> bool:
    top = target.split(".")[0]
    if module in ("errors", "table"):
        return False
    if module in ("config", "runtime", "tokenbytes"):
        return target == "errors"
    if module.startswith("store."):
        return top in BASE or target.startswith("store.")
    if module.startswith("capture."):
        return top in BASE or top in ("store", "capture")
    if module == "train.losses":
        return False  # the piece other stacks copy: self-contained
    if module == "train.minillm":
        return target == "train.losses"
    if module.startswith("train."):
        return (top in BASE or top in ("store", "train") or target.startswith("capture.teachers")
                or target == "capture.tokenization")
    return True  # commands: anything


def test_every_module_imports_only_the_layers_below_it():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for target in sorted(package_imports(path)):
            if target != module and not allowed(module, target):
                broken.append(f"{module} imports {target}")
    assert broken == [], "imports against ARCHITECTURE.md's layers:\n" + "\n".join(broken)


def test_the_rules_refuse_an_upward_import():
    assert "store.encodings" in package_imports(PACKAGE / "store" / "cache.py")  # the parser sees relative imports
    assert not allowed("store.cache", "train.losses")
    assert not allowed("capture.build", "train.distill")
    assert allowed("train.trainer", "capture.teachers.hf")


def test_every_module_is_described_in_architecture_md():
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    missing = [p.name for p in sorted(PACKAGE.rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and f"**{p.name}**" not in text and f"{p.name}**" not in text
               and f"**{p.parent.name}/**" not in text]
    assert missing == [], f"modules missing from ARCHITECTURE.md: {missing}"
