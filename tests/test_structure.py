"""The layout ARCHITECTURE.md describes, checked from the source (no module is imported):

- no module uses another module's private names: ``from tv_lens.x import _y``,
  ``import tv_lens.x as m; m._y``, or ``obj._y`` on an object other than ``self``/``cls`` where
  ``_y`` is another module's and not defined in the module itself (dunders and namedtuple's
  ``_replace``/``_asdict`` … excepted; third-party libraries' private names are out of scope);
- no import cycles among tv_lens modules (module-level and function-level imports both count);
- lower layers never import upper ones (the table in ARCHITECTURE.md).

The checker is run on planted violations too, so a checker that finds nothing fails.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: namedtuple's public API spelled with an underscore
NAMEDTUPLE = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class Module:
    name: str  # e.g. tv_lens.analysis.run
    path: Path
    tree: ast.Module
    where: str  # the path shown in messages, e.g. tv_lens/analysis/run.py

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def modules(root: Path, package: str = "tv_lens") -> dict[str, Module]:
    """Every module of ``package`` under ``root``, parsed."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = Module(".".join(parts), path, ast.parse(path.read_text("utf-8")),
                                      path.relative_to(root).as_posix())
    return out


def exports(mods: dict[str, Module], package: str) -> dict[str, str]:
    """The package's lazily exported names -> defining module (its ``_EXPORTS`` table)."""
    init = mods.get(package)
    for node in ast.walk(init.tree) if init else ():
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_EXPORTS":
            table = {}
            for key, value in zip(node.value.keys, node.value.values):
                if key is None:  # **{name: module for name in (...)}
                    names = [e.value for e in value.generators[0].iter.elts]
                    table.update(dict.fromkeys(names, value.value.value))
                else:
                    table[key.value] = value.value
            return table
    return {}


def imports(module: Module, mods: dict[str, Module], package: str) -> list[tuple[str, str | None, int]]:
    """``(module imported, name imported from it or None, line)`` for every import of a
    ``package`` module, anywhere in the file."""
    table = exports(mods, package)
    out = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names
                    if a.name.split(".")[0] == package]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != package:
                continue
            for a in node.names:
                if f"{base}.{a.name}" in mods:  # a submodule
                    out.append((f"{base}.{a.name}", None, node.lineno))
                elif base == package and a.name in table:  # the lazy export of a name
                    out.append((table[a.name], a.name, node.lineno))
                else:
                    out.append((base, a.name, node.lineno))
    return out


def graph(mods: dict[str, Module], package: str = "tv_lens") -> dict[str, set[str]]:
    """module -> the package modules it imports (the package's own lazy ``__init__`` left
    out: it imports nothing until a name is asked for, and then the module named above)."""
    return {m: {target for target, _, _ in imports(mod, mods, package)
                if target in mods and target not in (m, package)}
            for m, mod in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def defined_names(tree: ast.Module) -> set[str]:
    """Every name a module defines anywhere: functions, classes, assigned names and attributes
    (``self._x = …``), arguments, dataclass fields."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def private_uses(mods: dict[str, Module], package: str = "tv_lens") -> list[str]:
    """Every use of another module's private name, as ``path:line: what``. ``obj._y`` counts
    where ``_y`` is defined by another package module and not by this one (the type of ``obj``
    is not known from the source; a private name no package module defines is a third-party
    library's, such as argparse's)."""
    problems = []
    defined = {name: defined_names(module.tree) for name, module in mods.items()}
    for name, module in mods.items():
        where = module.where
        for target, imported, line in imports(module, mods, package):
            if imported is not None and private(imported) and target != name:
                problems.append(f"{where}:{line}: imports {target}.{imported}")
        aliases = {}  # local name -> module, for `import tv_lens.x as m` / `from tv_lens import x`
        others = set()  # names bound to modules outside the package
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    bound = a.asname or a.name.split(".")[0]
                    if a.name.split(".")[0] == package:
                        aliases[bound] = a.name if a.asname else package
                    else:
                        others.add(bound)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                inside = (node.module or "").split(".")[0] == package
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if inside and full in mods:
                        aliases[a.asname or a.name] = full
                    elif not inside:
                        others.add(a.asname or a.name)
        own = defined[name]
        elsewhere = set().union(*(d for m, d in defined.items() if m != name))
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Attribute) or not private(node.attr):
                continue
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            base = node.value.id if isinstance(node.value, ast.Name) else None
            if base in ("self", "cls") or node.attr in NAMEDTUPLE:
                continue
            if base in aliases and aliases[base] != name:
                problems.append(f"{where}:{node.lineno}: uses {aliases[base]}.{node.attr}")
            elif isinstance(root, ast.Name) and root.id in others:
                continue  # a third-party module's private name (e.g. torch.ops.mkldnn._x)
            elif node.attr not in own and node.attr in elsewhere:
                problems.append(f"{where}:{node.lineno}: uses {ast.unparse(node)} "
                                f"(private to another module)")
    return problems


def layers(text: str) -> list[tuple[str, list[str]]]:
    """The layer table of ARCHITECTURE.md: ``| n. name | `module`, `package/` … |`` rows, lowest
    first."""
    rows = []
    for line in text.splitlines():
        match = re.match(r"\|\s*(\d+)\.\s*([^|]+?)\s*\|([^|]*)\|", line)
        if match:
            rows.append((match.group(2), re.findall(r"`([\w./]+)`", match.group(3))))
    return rows


def layer_of(module: str, table: list[tuple[str, list[str]]], package: str = "tv_lens") -> int | None:
    """The layer index of ``module`` (``package/`` entries cover a subpackage)."""
    short = module[len(package) + 1:] if module != package else ""
    for i, (_, entries) in enumerate(table):
        for entry in entries:
            if entry.endswith("/") and (short + ".").startswith(entry[:-1].replace("/", ".") + "."):
                return i
            if short == entry.replace("/", "."):
                return i
    return None


def layer_violations(mods: dict[str, Module], table, package: str = "tv_lens") -> list[str]:
    """Modules missing from the table, and imports of a higher layer."""
    problems = [f"{m}: in no layer of the table" for m in mods
                if m != package and layer_of(m, table, package) is None]
    for m, targets in graph(mods, package).items():
        mine = layer_of(m, table, package)
        for t in sorted(targets):
            theirs = layer_of(t, table, package)
            if None not in (mine, theirs) and theirs > mine:
                problems.append(f"{m} (layer {mine + 1}, {table[mine][0]}) imports {t} "
                                f"(layer {theirs + 1}, {table[theirs][0]})")
    return problems


# --------------------------------------------------------------------------- the real tree
@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return modules(ROOT)


def test_no_module_uses_another_modules_private_names(tree):
    assert private_uses(tree) == []


def test_no_import_cycles(tree):
    assert cycles(graph(tree)) == []


def test_lower_layers_never_import_upper_ones(tree):
    table = layers((ROOT / "ARCHITECTURE.md").read_text("utf-8"))
    assert len(table) >= 5, "ARCHITECTURE.md lost its layer table"
    assert layer_violations(tree, table) == []


# --------------------------------------------------------------------------- planted violations
PLANTED = {
    "pkg/__init__.py": '_EXPORTS: dict[str, str] = {"Thing": "pkg.low"}\n',
    "pkg/low.py": "import pkg.high\n\n\ndef _helper():\n    pass\n\n\nclass Thing:\n"
                  "    def _fits(self):\n        return self._fits\n",
    "pkg/high.py": "from pkg.low import _helper, Thing\nimport pkg.low as low\nimport torch\n\n\n"
                   "def f(tv):\n    low._helper()\n    tv._fits()\n    t = Thing()\n"
                   "    return t._replace(), t.__class__, torch.ops._x, tv._unknown_to_pkg\n\n\n"
                   "def g():\n    from pkg import Thing\n",
}


@pytest.fixture
def planted(tmp_path) -> dict[str, Module]:
    for relative, text in PLANTED.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return modules(tmp_path, "pkg")


def test_checker_finds_planted_private_uses(planted):
    found = private_uses(planted, "pkg")
    assert found == ["pkg/high.py:1: imports pkg.low._helper", "pkg/high.py:7: uses pkg.low._helper",
                     "pkg/high.py:8: uses tv._fits (private to another module)"]


def test_checker_finds_planted_cycles_and_layer_violations(planted):
    edges = graph(planted, "pkg")
    assert edges == {"pkg": set(), "pkg.low": {"pkg.high"}, "pkg.high": {"pkg.low"}}
    assert cycles(edges) == [["pkg.high", "pkg.low"]]
    table = layers("| layer | modules |\n|---|---|\n| 1. base | `low` |\n| 2. top | `high` |\n")
    assert layer_violations(planted, table, "pkg") == [
        "pkg.low (layer 1, base) imports pkg.high (layer 2, top)"]
    assert layer_of("tv_lens.analysis.run", [("a", ["analysis/"])]) == 0


def raised_classes(mods: dict[str, Module]) -> dict[str, set[str]]:
    """``class name -> modules`` of every ``raise Name(...)`` / ``raise Name`` in the package."""
    out: dict[str, set[str]] = {}
    for name, module in mods.items():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name):
                    out.setdefault(exc.id, set()).add(name)
    return out


def test_every_raised_tv_lens_error_is_exported(tree):
    """Every error class of ``tv_lens.errors`` is a public name of ``tv_lens``, and every class
    the package raises is one of them or a Python built-in (a few internal helpers build the
    exported classes: ``config_error``, ``_corrupt``, …; ``Terminated`` is the CLI's signal
    carrier and never leaves ``main``)."""
    import builtins

    import tv_lens
    from tv_lens import errors

    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert defined and defined <= set(tv_lens.__all__), defined - set(tv_lens.__all__)
    helpers = {"config_error", "_corrupt", "_vocab_error", "not_an_index", "Terminated"}
    foreign = {name: where for name, where in raised_classes(tree).items()
               if name not in defined and name not in helpers and not hasattr(builtins, name)}
    assert not foreign, foreign
