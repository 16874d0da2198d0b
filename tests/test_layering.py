"""Import direction (STYLE.md): tools -> pipeline; trainer -> pipeline; pipeline imports neither.

Checked on the source text (every import statement, at any depth, relative ones resolved), so an
import inside a function counts as much as one at the top of a module.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pipeline": ("alexnet.tools", "alexnet.trainer"),
    "trainer": ("alexnet.tools",),
    "tools": ("alexnet.trainer",),
}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in a module of ``alexnet.<package>``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against alexnet.<package>
                base = ["alexnet", package][: 3 - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from .. import tools` names a module in the imported names
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(path, package)
        if any(_is_under(module, prefix) for prefix in FORBIDDEN[package])
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from .. import tools\ndef f():\n    from ..trainer.train import x\n    import alexnet.tools.sample\n"
    )
    found = [m for _, m in imported_modules(module, "pipeline")]
    assert "alexnet.tools" in found and "alexnet.trainer.train.x" in found and "alexnet.tools.sample" in found


def test_contract_and_image_modules_import_no_heavy_library():
    """The offline tools start fast: the data contract and the image steps pull in no PIL, DALI or torch."""
    code = (
        "import sys, alexnet.pipeline.artifacts, alexnet.pipeline.images\n"
        "print(sorted(m for m in ('PIL', 'torch', 'nvidia.dali') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
