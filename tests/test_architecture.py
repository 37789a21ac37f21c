"""The layout rules of docs/ARCHITECTURE.md, checked on the source: no import circle, small
modules and functions in the application layer, no private name taken from another module, the
layers importing downwards only, and no reference to a file the project does not hold."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ckaad_fast"
# The lower floors: kernels, the ops and the networks. Everything else in the package is the
# application layer, where no function may grow past about a screen.
LOWER = ("ckaad_fast.ops", "ckaad_fast.models", "ckaad_fast.kernels")
# What the lower floors may import besides each other: the NVTX ranges, which know nothing else.
FOUNDATION = LOWER + ("ckaad_fast.profiling",)
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):  # installed as ckaad_fast.kernels
        name = "ckaad_fast.kernels" + ("" if path.stem == "__init__" else "." + path.stem)
        mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from . import ops` imports the module ckaad_fast.ops.
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in subs]
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
    return [(t, names, line) for t, names, line in out if t in MODULES]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_import_circle():
    # Importing a package's module also runs the package's __init__, but that is no edge of its
    # own here: an __init__ only hands on its modules' names.
    edges = {m: {t for t, _, _ in imps if t != m} for m, imps in GRAPH.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_lower_floors_never_import_the_application():
    bad = [f"{m} imports {t}" for m, imps in GRAPH.items() if m.startswith(LOWER)
           for t, _, _ in imps if not t.startswith(FOUNDATION)]
    assert not bad, bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines: split it by job"


def test_application_functions_are_short():
    long = []
    for name, path in MODULES.items():
        if name.startswith(LOWER):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{m}:{line} takes {n} from {t}" for m, imps in GRAPH.items() for t, names, line in imps
           for n in names if n.startswith("_") and not n.startswith("__")]
    # A private module (ops/_backend.py) serves its own package only.
    for m, imps in GRAPH.items():
        for t, _, line in imps:
            parent, _, last = t.rpartition(".")
            if last.startswith("_") and not last.startswith("__") and m != parent and not m.startswith(parent + "."):
                bad.append(f"{m}:{line} imports the private module {t}")
    assert not bad, bad


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / f for f in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        files = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [p for p in files if p.suffix in (".py", ".md", ".txt", ".toml", ".cfg") and p.is_file()]


def test_nothing_refers_to_a_file_outside_the_project():
    # The project documents itself: a design note that lives elsewhere is no help to a reader.
    this = Path(__file__).resolve()
    bad = [str(p.relative_to(ROOT)) for p in _tracked_text_files()
           if p.resolve() != this and "DESIGN.md" in p.read_text(errors="replace")]
    assert not bad, f"these cite a DESIGN.md the project does not hold: {bad}"


def test_markdown_links_resolve():
    broken = []
    for md in [p for p in _tracked_text_files() if p.suffix == ".md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def _floors_of_this_page() -> dict[str, int]:
    """{module prefix: floor} from the table under 'The layers' in docs/ARCHITECTURE.md: each
    row's backticked paths (a file, or a folder with a trailing slash; bare names continue the
    row's folder)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not m:
            continue
        folder = ""
        for path in re.findall(r"`([^`]+)`", m.group(2)):
            if path.startswith("kernels/"):
                floors["ckaad_fast.kernels"] = int(m.group(1))
                continue
            if "/" in path.rstrip("/"):
                folder = path.rstrip("/").rsplit("/", 1)[0] + "/"  # where the row's bare names live
            full = path if "/" in path else folder + path
            name = full.removesuffix("/").removesuffix(".py").replace("/", ".")
            floors[name.removesuffix(".__init__")] = int(m.group(1))
    return floors


def _floor(module: str, floors: dict[str, int]) -> int | None:
    best = None
    for prefix, floor in floors.items():
        # The package root (its __init__) places itself only, never the modules under it.
        inside = module.startswith(prefix + ".") and prefix != "ckaad_fast"
        if (module == prefix or inside) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, floor)
    return None if best is None else best[1]


def test_every_import_goes_down_the_floors_of_this_page():
    floors = _floors_of_this_page()
    unplaced = [m for m in MODULES if _floor(m, floors) is None]
    assert not unplaced, f"modules the table of docs/ARCHITECTURE.md does not place: {unplaced}"
    bad = []
    for m, imps in GRAPH.items():
        home = max((p for p in floors if m == p or (m.startswith(p + ".") and p != "ckaad_fast")), key=len)
        for t, _, line in imps:
            if t == home or t.startswith(home + "."):
                continue  # within its own folder (or the package root's version)
            if _floor(t, floors) >= _floor(m, floors):
                bad.append(f"{m}:{line} (floor {_floor(m, floors)}) imports {t} (floor {_floor(t, floors)})")
    assert not bad, bad


def test_the_floor_rule_can_fail():
    # The page's parser finds every floor, so a wrong placement is caught, not skipped.
    floors = _floors_of_this_page()
    assert floors["ckaad_fast.head"] == 4 and floors["ckaad_fast.model"] == 5 and floors["ckaad_fast.kernels"] == 1
    assert _floor("ckaad_fast.scoring.engine", floors) > _floor("ckaad_fast.model", floors)
    assert _floor("ckaad_fast.data.registry", floors) == floors["ckaad_fast.data"]
    assert _floor("ckaad_fast.not_in_the_table", floors) is None


# ------------------------------------------------------------------------------------------------
# One owner for every default: the CLI restates none, and no run-time choice has a literal
# default outside its owner (docs/ARCHITECTURE.md, "One place for each rule and default").
# ------------------------------------------------------------------------------------------------
#: The options that may keep a literal default: output folders.
CLI_LITERAL_ALLOWED = {"--out"}
#: The run-time choices whose defaults have one owner each (runtime/plan.py, model.DEFAULT_TOPK,
#: decisions.DEFAULT_SENSITIVITY, calibration.TARGET_FPR and CALIBRATE_SHARE).
OWNED_CHOICES = {"precision", "dtype", "engine", "topk", "target_fpr", "sensitivity", "calibrate_share"}
#: Where those literals live: each owner, and the ops (which know nothing of CKAAD's defaults).
OWNERS = {"ckaad_fast.runtime.plan"}


def _cli_literal_defaults(source: str) -> list[str]:
    """``add_argument`` calls of ``source`` whose default is a string or decimal literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flag = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else "?"
            for kw in node.keywords:
                if (kw.arg == "default" and isinstance(kw.value, ast.Constant)
                        and isinstance(kw.value.value, (str, float)) and flag not in CLI_LITERAL_ALLOWED):
                    found.append(f"{flag}={kw.value.value!r} (line {node.lineno})")
    return found


def _owned_literal_defaults(source: str) -> list[str]:
    """Parameters and dataclass fields named after an owned choice with a literal default (not
    None, not a name the owner exports)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = ([None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults)
                        + list(node.args.kw_defaults))
            for arg, default in zip(args, defaults):
                if arg.arg in OWNED_CHOICES and isinstance(default, ast.Constant) and default.value is not None:
                    found.append(f"{node.name}({arg.arg}={default.value!r})")
        elif isinstance(node, ast.ClassDef):
            for st in node.body:
                if (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
                        and st.target.id in OWNED_CHOICES and isinstance(st.value, ast.Constant)
                        and st.value.value is not None):
                    found.append(f"{node.name}.{st.target.id} = {st.value.value!r}")
    return found


def test_the_cli_restates_no_default():
    bad = {name: found for name, path in MODULES.items() if name.startswith("ckaad_fast.cli")
           for found in [_cli_literal_defaults(path.read_text())] if found}
    assert not bad, f"literal defaults in the CLI (default=None, or the API's constant): {bad}"


def test_each_run_time_choice_has_one_owner():
    bad = {name: found for name, path in MODULES.items() if name not in OWNERS
           for found in [_owned_literal_defaults(path.read_text())] if found}
    assert not bad, f"run-time defaults outside their owner (take None, or the owner's constant): {bad}"


def test_the_default_checks_can_fail():
    assert _cli_literal_defaults('p.add_argument("--dtype", default="float32")\n'
                                 'p.add_argument("--rate", default=0.01)\n'
                                 'p.add_argument("--out", default="runs")\n'
                                 'p.add_argument("--x", default=None)\n') == ["--dtype='float32' (line 1)",
                                                                            "--rate=0.01 (line 2)"]
    assert _owned_literal_defaults("def f(a, topk=100, engine=None, precision=DEFAULT): pass\n"
                                   "class C:\n    target_fpr: float = 0.01\n    sensitivity: float = S\n") == [
        "f(topk=100)", "C.target_fpr = 0.01"]


# ------------------------------------------------------------------------------------------------
# The deployment path runs without PyTorch: importing its modules never imports torch. Counted
# here: what runs when a module is imported (its body, class bodies, but not function bodies, nor
# `if TYPE_CHECKING:` blocks); a function may import torch where only the torch path calls it, and
# tests/test_deployment.py runs the path itself with torch blocked.
# ------------------------------------------------------------------------------------------------
TORCH_FREE = ("ckaad_fast.deployment", "ckaad_fast.scoring.deployed", "ckaad_fast.cli", "ckaad_fast.cli.score")


def _at_import(tree: ast.Module) -> list[ast.stmt]:
    """The statements that run when the module is imported."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo += node.orelse
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo += [n for n in getattr(node, field, []) if isinstance(n, (ast.stmt, ast.excepthandler))]
    return out


def _import_time_targets(name: str) -> set[str]:
    """The package's modules ``name`` imports when it is imported."""
    lines = {n.lineno for n in _at_import(ast.parse(MODULES[name].read_text()))}
    return {t for t, _, line in GRAPH[name] if line in lines}


def _closure(roots) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m in seen or m not in GRAPH:
            continue
        seen.add(m)
        todo += sorted(_import_time_targets(m))
        parent = m.rsplit(".", 1)[0]
        if parent in MODULES and parent != m:  # importing a module runs its package's __init__
            todo.append(parent)
    return seen


def _imports_torch(source: str) -> bool:
    for node in _at_import(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if any(n == "torch" or n.startswith("torch.") for n in names):
            return True
    return False


def test_the_deployment_path_imports_no_torch():
    modules = _closure(TORCH_FREE)
    assert {"ckaad_fast.deployment", "ckaad_fast.pixels", "ckaad_fast.scoring.results",
            "ckaad_fast.calibration.thresholds", "ckaad_fast.runtime.plan"} <= modules
    bad = sorted(m for m in modules if _imports_torch(MODULES[m].read_text()))
    assert not bad, f"the deployment path reaches modules that import torch when imported: {bad}"
    assert _imports_torch("import numpy\nif x:\n    import torch.nn\n")
    assert not _imports_torch("# torch\nimport torchvision\ndef f():\n    import torch\n")
    assert not _imports_torch("if TYPE_CHECKING:\n    import torch\n")
