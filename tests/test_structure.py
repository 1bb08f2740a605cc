"""The package's import graph, read from the source with ast: no cycles (deferred imports count too) and no
module importing another module's underscore name."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "featx")


def _modules():
    """{dotted name: path} of every module in featx/ (a package is its __init__)."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def _imports(path, name, modules):
    """[(imported module, imported names or None, line)] of every import in the file, at any depth."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "featx"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "featx":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:   # `from featx.x import module`
                    out.append((sub, None, node.lineno))
                else:
                    out.append((base, a.name, node.lineno))
    return out


def graph():
    modules = _modules()
    edges, private = {}, []
    for name, path in modules.items():
        deps = set()
        for mod, symbol, line in _imports(path, name, modules):
            target = mod if mod in modules else mod.rsplit(".", 1)[0]
            if target != name:
                deps.add(target)
                if symbol and symbol.startswith("_") and not symbol.startswith("__"):
                    private.append(f"{name}:{line} imports {mod}.{symbol}")
                if any(p.startswith("_") and not p.startswith("__") for p in target.split(".")):
                    private.append(f"{name}:{line} imports the private module {target}")
        edges[name] = deps
    return modules, edges, private


def _cycles(edges):
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def _parents(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_import_graph_has_no_cycles():
    _, edges, _ = graph()
    # Importing a.b.c runs a and a.b first: a package's __init__ importing its own submodules is not a cycle,
    # but a submodule importing a package __init__ that imports it back is.
    cleaned = {k: {d for d in v if d not in _parents(k)} for k, v in edges.items()}
    assert _cycles(cleaned) == []


def test_no_module_imports_another_modules_private_names():
    _, _, private = graph()
    assert private == []


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
