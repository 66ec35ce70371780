"""The package's import graph has no circle, and installing it adds no top-level `kernels`."""
import ast
import subprocess
import sys
from pathlib import Path

import fastgrok

PACKAGE = Path(fastgrok.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every fastgrok module `path` imports, at the top or inside a function
    (a lazy import still makes a circle a reader has to untangle)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "fastgrok" or m.startswith("fastgrok.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_in_the_package():
    edges = graph()
    assert "fastgrok.population" in edges and "fastgrok.backends.torch_engine" in edges
    # A package's __init__ is imported with each of its modules; counting those
    # edges from the parent would only repeat the modules' own imports.
    cycle = find_cycle({k: {m for m in v if not k.startswith(m + ".")} for k, v in edges.items()})
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_installing_adds_no_top_level_kernels_module(tmp_path):
    """PyPI's `kernels` package must not be shadowed by fastgrok's, nor the reverse:
    from a neutral directory, `import kernels` finds nothing of fastgrok's."""
    probe = ("import importlib.util, sys; spec = importlib.util.find_spec('kernels'); "
             "print(spec.origin if spec and spec.origin else spec and list(spec.submodule_search_locations))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(PACKAGE.parent) not in out.stdout, f"`import kernels` finds fastgrok's code: {out.stdout}"
    import fastgrok.kernels  # noqa: F401  (where the kernels live now)
