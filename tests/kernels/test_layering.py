"""The kernel layer imports nothing from above: no module of cl_core/kernels imports the
engine or any other part of cl_core outside cl_core.kernels, at module level or inside
functions (docs/design.md §7, Layers)."""
from __future__ import annotations

import ast

from tests.helpers import ROOT

KERNELS = ROOT / "cl_core" / "kernels"


def _imports(path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, nested ones included."""
    out = []
    package = "cl_core.kernels"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against cl_core.kernels (a flat package)
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            out.append((node.lineno, name))
    return out


def test_kernels_import_only_the_kernel_layer():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 7, files  # the package was found
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}"
           for p in files for line, name in _imports(p)
           if (name == "cl_core" or name.startswith("cl_core.")) and not
           (name == "cl_core.kernels" or name.startswith("cl_core.kernels."))]
    assert bad == [], "the kernel layer must not import from above it:\n" + "\n".join(bad)


def test_the_check_sees_function_level_imports(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("import torch\n\ndef f():\n    from cl_core.dema.fused import FusedStep\n    from . import layouts\n")
    assert _imports(src) == [(1, "torch"), (4, "cl_core.dema.fused"), (5, "cl_core.kernels")]
