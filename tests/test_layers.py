"""The layers of cl_core point one way and its modules form no import cycle.

The import graph is read from the source with `ast`, so every import counts: module
level, inside functions, under `if TYPE_CHECKING:`, in `try:` blocks, relative imports
(resolved against the importing module) and `importlib.import_module("cl_core....")`
with a literal name. A failure lists each offending edge as `module:line -> module`.

Layers, lowest first; a module may import from its own layer and the layers below:
  kernels       cl_core.kernels.*, cl_core.atomic_io
  engine        cl_core.dema.*
  integrations  cl_core.integrations.*
  tools         cl_core.grouping, cl_core.metrics, cl_core.task_files, cl_core.lora_sets, cl_core.moelora
  runner        cl_core.continual.*, cl_core.cli.*, cl_core.__main__
cl_core/__init__.py is the facade (the public names, loaded lazily): it may import
anything, and nothing inside the package imports it, because a module that takes its
names from the facade depends on every layer the facade reaches. The one name taken from
it is `__version__`, which lives there (pyproject.toml reads the version from it).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = "cl_core"
LAYERS = [  # lowest first: (layer name, module prefixes)
    ("kernels", ["cl_core.kernels", "cl_core.atomic_io"]),
    ("engine", ["cl_core.dema"]),
    ("integrations", ["cl_core.integrations"]),
    ("tools", ["cl_core.grouping", "cl_core.metrics", "cl_core.task_files", "cl_core.lora_sets",
               "cl_core.moelora"]),
    ("runner", ["cl_core.continual", "cl_core.cli", "cl_core.__main__"]),
]
# names a module may import from the facade: those defined in the facade itself
FACADE_OWN_NAMES = {"__version__"}


@dataclass(frozen=True)
class Edge:
    importer: str
    line: int
    target: str
    names: tuple[str, ...] = ()  # what a from-import takes from the target (empty for `import x`)

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} -> {self.target}"


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under root/package: dotted name -> file."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module that `import name` loads last: name itself, or the longest known prefix."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _resolve_relative(importer: str, level: int, module: str | None, modules: dict[str, Path]) -> str:
    # the package a relative import starts from: the importer itself when it is a
    # package's __init__, else the package holding it; each extra dot goes one up
    base = importer.split(".") if _is_package(importer, modules) else importer.split(".")[:-1]
    if level - 1 > len(base) - 1:
        raise ValueError(f"{importer}: relative import with {level} dots goes above the top package")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_edges(modules: dict[str, Path], package: str) -> list[Edge]:
    """Every import inside `package` of a module of `package`, in module and line order."""
    found: dict[tuple[str, int, str], list[str]] = {}
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets = []  # (line, dotted name that is loaded, name taken from it or None)
            if isinstance(node, ast.Import):
                targets = [(node.lineno, alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module if node.level == 0 else _resolve_relative(importer, node.level, node.module,
                                                                            modules)
                for alias in node.names:
                    # `from pkg import name` loads the submodule pkg.name when there is one;
                    # otherwise it reads the attribute `name` of pkg
                    sub = f"{base}.{alias.name}"
                    targets.append((node.lineno, sub, None) if sub in modules else (node.lineno, base, alias.name))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and isinstance(node.func.value, ast.Name)
                  and node.func.value.id == "importlib" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                targets = [(node.lineno, node.args[0].value, None)]
            for line, name, taken in targets:
                if name != package and not name.startswith(package + "."):
                    continue
                target = _owner(name, modules)
                if target is None or target == importer:  # a module naming itself loads nothing new
                    continue
                names = found.setdefault((importer, line, target), [])
                if taken is not None:
                    names.append(taken)
    return [Edge(i, line, t, tuple(names)) for (i, line, t), names in sorted(found.items())]


def layer_of(module: str, layers) -> int | None:
    for rank, (_, prefixes) in enumerate(layers):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def unassigned_modules(modules: dict[str, Path], package: str, layers) -> list[str]:
    return [m for m in modules if m != package and layer_of(m, layers) is None]


def upward_edges(edges: list[Edge], layers) -> list[str]:
    """Each import from a lower layer into a higher one, with both layers named."""
    out = []
    for e in edges:
        src, dst = layer_of(e.importer, layers), layer_of(e.target, layers)
        if src is not None and dst is not None and dst > src:
            out.append(f"{e}  ({layers[src][0]} imports {layers[dst][0]})")
    return out


def facade_edges(edges: list[Edge], package: str, own_names=frozenset()) -> list[str]:
    """Each import of the facade by a module of the package, but for the facade's own names."""
    out = []
    for e in edges:
        if e.target != package or e.importer == package:
            continue
        taken = [n for n in e.names if n not in own_names]
        if e.names and not taken:
            continue
        out.append(f"{e}  (imports the facade{': ' + ', '.join(taken) if taken else ''}; "
                   "import from the module that defines it)")
    return out


def cycle_edges(edges: list[Edge], exempt=frozenset()) -> list[list[str]]:
    """The import cycles: one list per strongly connected component of more than one
    module, holding every edge inside it (each such edge lies on a cycle)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.importer not in exempt:
            graph.setdefault(e.importer, set()).add(e.target)
            graph.setdefault(e.target, set())
    # Tarjan's algorithm, iterative (no recursion limit on a deep graph)
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted([str(e) for e in edges if e.importer in c and e.target in c and e.importer not in exempt]
                  for c in components)


def layer_problems(root: Path, package: str, layers, own_names=frozenset()) -> list[str]:
    """Everything wrong with the package's imports, as lines of a failure message."""
    modules = package_modules(root, package)
    if package not in modules:
        raise ValueError(f"{root / package} is not a package (no __init__.py)")
    edges = import_edges(modules, package)
    problems = [f"{m}: in no layer (add its prefix to LAYERS)" for m in unassigned_modules(modules, package, layers)]
    up = upward_edges(edges, layers)
    if up:
        problems += ["imports from a lower layer into a higher one:", *(f"  {x}" for x in up)]
    facade = facade_edges(edges, package, own_names)
    if facade:
        problems += ["imports of the facade from inside the package:", *(f"  {x}" for x in facade)]
    for n, cycle in enumerate(cycle_edges(edges, exempt={package}), 1):
        problems += [f"import cycle {n}:", *(f"  {x}" for x in cycle)]
    return problems


def test_cl_core_imports_point_down_the_layers_and_form_no_cycle():
    problems = layer_problems(ROOT, PACKAGE, LAYERS, FACADE_OWN_NAMES)
    assert not problems, "\n" + "\n".join(problems)


# Inside the engine: the two-pass backends (dema/twopass/) and the one-pass step
# (dema/onepass/) are two implementations behind the engine: neither imports the other, nor
# the engine or DEMAOptimizer that dispatch to them; the one-pass protocols import none of
# their implementations.
IMPLEMENTATIONS = ("cl_core.dema.twopass", "cl_core.dema.onepass")
DISPATCHERS = ("cl_core.dema.engine", "cl_core.dema.optim")


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def engine_structure_problems(edges: list[Edge]) -> list[str]:
    out = []
    for e in edges:
        for mine in IMPLEMENTATIONS:
            if not _inside(e.importer, mine):
                continue
            other = [p for p in IMPLEMENTATIONS if p != mine and _inside(e.target, p)]
            if other or any(_inside(e.target, d) for d in DISPATCHERS):
                out.append(f"{e}  (an implementation imports {'the other' if other else 'its dispatcher'})")
        if e.importer == "cl_core.dema.onepass.protocols" and _inside(e.target, "cl_core.dema.onepass"):
            out.append(f"{e}  (the protocols import an implementation)")
    return out


def test_engine_implementations_are_independent_of_each_other_and_of_their_dispatchers():
    edges = import_edges(package_modules(ROOT, PACKAGE), PACKAGE)
    assert any(_inside(e.importer, "cl_core.dema.onepass") for e in edges)   # the graph is seen
    problems = engine_structure_problems(edges)
    assert not problems, "\n" + "\n".join(problems)
    # and the check can fail
    bad = [Edge("cl_core.dema.twopass.reference", 3, "cl_core.dema.onepass.step"),
           Edge("cl_core.dema.onepass.protocols", 5, "cl_core.dema.onepass.step"),
           Edge("cl_core.dema.onepass.step", 7, "cl_core.dema.engine")]
    assert len(engine_structure_problems(bad)) == 3


# The checker itself, on small packages written here, so the test above cannot pass
# because the checker sees nothing.

SYNTH_LAYERS = [("low", ["pkg.low"]), ("high", ["pkg.high"])]


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"pkg/__init__.py": "", "pkg/low/__init__.py": "", "pkg/high/__init__.py": "",
                      **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_passes_a_graph_that_only_imports_downward(tmp_path):
    root = _write_package(tmp_path, {
        "pkg/low/a.py": "import os\n",
        "pkg/low/b.py": "from pkg.low import a\nfrom . import a as again\n",
        "pkg/high/c.py": "import pkg.low.b\nfrom ..low.a import x\n",
        "pkg/__init__.py": "from pkg.high import c\n",  # the facade may import anything
    })
    assert layer_problems(root, "pkg", SYNTH_LAYERS) == []
    # and the edges were seen, relative imports resolved to the modules they load
    edges = {(e.importer, e.target) for e in import_edges(package_modules(root, "pkg"), "pkg")}
    assert edges == {("pkg.low.b", "pkg.low.a"), ("pkg.high.c", "pkg.low.b"), ("pkg.high.c", "pkg.low.a"),
                     ("pkg", "pkg.high.c")}


def test_checker_flags_upward_imports_at_module_function_and_type_checking_level(tmp_path):
    root = _write_package(tmp_path, {
        "pkg/high/c.py": "X = 1\n",
        "pkg/low/a.py": ("from typing import TYPE_CHECKING\n"
                         "import pkg.high.c\n"
                         "if TYPE_CHECKING:\n"
                         "    from ..high.c import X\n"
                         "def f():\n"
                         "    from pkg.high import c\n"
                         "    import importlib\n"
                         "    return importlib.import_module('pkg.high.c')\n"),
    })
    assert layer_problems(root, "pkg", SYNTH_LAYERS) == [
        "imports from a lower layer into a higher one:",
        "  pkg.low.a:2 -> pkg.high.c  (low imports high)",
        "  pkg.low.a:4 -> pkg.high.c  (low imports high)",
        "  pkg.low.a:6 -> pkg.high.c  (low imports high)",
        "  pkg.low.a:8 -> pkg.high.c  (low imports high)",
    ]


def test_checker_flags_a_cycle_inside_one_layer_through_a_function_level_import(tmp_path):
    root = _write_package(tmp_path, {
        "pkg/low/a.py": "from pkg.low.b import y\n",
        "pkg/low/b.py": "def y():\n    from pkg.low import c\n",
        "pkg/low/c.py": "import pkg.low.a\n",
        "pkg/low/d.py": "import pkg.low.a\n",  # points into the cycle, is not on it
    })
    assert layer_problems(root, "pkg", SYNTH_LAYERS) == [
        "import cycle 1:",
        "  pkg.low.a:1 -> pkg.low.b",
        "  pkg.low.b:2 -> pkg.low.c",
        "  pkg.low.c:1 -> pkg.low.a",
    ]


def test_checker_flags_facade_imports_but_the_facades_own_names(tmp_path):
    root = _write_package(tmp_path, {
        "pkg/__init__.py": "__version__ = '1'\nfrom pkg.high.c import C\n",
        "pkg/high/c.py": "from pkg import __version__\nC = 1\n",
        "pkg/low/a.py": "from pkg import C, __version__\n",
        "pkg/low/b.py": "import pkg\nfrom pkg import low\n",  # `low` is a subpackage, not a facade name
    })
    problems = layer_problems(root, "pkg", SYNTH_LAYERS, own_names={"__version__"})
    assert problems == [
        "imports of the facade from inside the package:",
        "  pkg.low.a:1 -> pkg  (imports the facade: C; import from the module that defines it)",
        "  pkg.low.b:1 -> pkg  (imports the facade; import from the module that defines it)",
    ]


def test_checker_names_a_module_in_no_layer(tmp_path):
    root = _write_package(tmp_path, {"pkg/stray.py": "import pkg.low\n"})
    assert layer_problems(root, "pkg", SYNTH_LAYERS) == ["pkg.stray: in no layer (add its prefix to LAYERS)"]


def test_checker_refuses_a_relative_import_above_the_top_package(tmp_path):
    root = _write_package(tmp_path, {"pkg/low/a.py": "from ... import x\n"})
    with pytest.raises(ValueError, match=r"pkg\.low\.a: relative import with 3 dots goes above the top package"):
        layer_problems(root, "pkg", SYNTH_LAYERS)
