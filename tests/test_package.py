"""The package's shape, read from its source with `ast`: no import cycle between its modules (a
function-level import counts), no function longer than a reader holds in their head (numba and
Triton kernels aside), and no look-up of an untyped study record."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "diffcraft"
MAX_FUNCTION_LINES = 80
KERNEL_DECORATORS = ("njit", "jit", "triton.jit", "numba.njit", "numba.jit")


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module in the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in it (module level or in a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name imported from a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph` (Tarjan's strongly connected components of two modules or more)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_package_not_even_inside_functions():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "diffcraft.study.report" in graph["diffcraft.study.runner"]  # the reader sees the imports
    assert cycles(graph) == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for other in graph[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_transfer_serving_and_model_uris_do_not_import_the_study_engine():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    for name in ("diffcraft.transfer", "diffcraft.serving", "diffcraft.model_uri", "diffcraft.figures"):
        assert not {m for m in reachable(graph, name) if m.startswith("diffcraft.study")}, name


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from pkg.b import g\n")
    (tmp_path / "b.py").write_text("def g():\n    from pkg import a\n    return a\n")
    known = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def _is_kernel(node: ast.FunctionDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target) in KERNEL_DECORATORS:
            return True
    return False


def test_no_function_is_longer_than_a_reader_holds():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_no_study_state_is_looked_up_by_string():
    """The study's record is a `StudyRecord` with named fields, not a dict called state."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{i}" for path in modules().values()
             for i, line in enumerate(path.read_text().splitlines(), 1) if 'state["' in line or "state['" in line]
    assert found == []


def test_the_cluster_kit_has_one_import_path():
    """`tests` is a package, so `tests.kit` (one process registry, one set of handed-out ports) is
    the only name the harness has, and every test imports it by that name."""
    import importlib.util
    import sys

    import tests.kit

    assert Path(tests.kit.__file__).parent == Path(__file__).parent / "kit"
    assert str(Path(__file__).parent) not in sys.path
    assert importlib.util.find_spec("kit") is None and importlib.util.find_spec("clusterkit") is None
    other_ways = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            other_ways += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("kit", "clusterkit")]
    assert other_ways == []
