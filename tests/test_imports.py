"""Imports point down (style rule 9): no cycle among neuroal's modules, no
function-local import of a neuroal module hiding one, leaf modules that import nothing higher,
and every module importable on its own (no dependence on what was imported before it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "neuroal"

# Function-local imports of neuroal modules that stay, each with its reason: (module, imported).
LAZY_ALLOWED = {
    # `import neuroal` (the console script's dispatcher, every plug-in) must not import torch,
    # transformers and every registry: the root package's functions import them when called.
    ("neuroal", "neuroal.config.build"),
    ("neuroal", "neuroal.pipeline"),
    ("neuroal", "neuroal.commands.evaluate"),
    # ... and the light package __init__s above them (only the deprecation table's forwarder)
    ("neuroal", "neuroal.config"),
    ("neuroal", "neuroal.commands"),
}

# Leaf modules: they import no neuroal module outside this set (TYPE_CHECKING imports apart).
# ``neuroal`` is the root package, imported first by every submodule anyway; its module level
# imports only the schema.
LEAVES = {"neuroal", "neuroal.runtime", "neuroal.runtime.moved", "neuroal.runtime.errors",
          "neuroal.runtime.jobs", "neuroal.runtime.registry", "neuroal.runtime.process",
          "neuroal.config", "neuroal.config.inputs", "neuroal.config.schema"}

# The groups (first level under neuroal/), lowest floor first: a module imports modules of its
# own group or of groups below it, never above (the README's "How it works" reads this order
# bottom-up). The root package, the CLI and the pipeline sit on top of every group.
FLOORS = ["runtime", "config", "data", "criteria", "allocation", "models", "capture", "outputs",
          "recovery", "engine", "evaluation", "planning"]
TOP = {"neuroal", "neuroal.cli", "neuroal.pipeline"}
TOP_GROUPS = {"commands"}  # the subcommands: entry points beside the CLI
# Module-level imports across floors that stay, each with its reason: (module, group imported).
UPWARD_ALLOWED = {
    # The validated build of a config checks every name against its plug-in registry and the
    # engine's choices before any weight is loaded: the edge of the run, above the plug-ins.
    ("neuroal.config.build", "data"), ("neuroal.config.build", "criteria"),
    ("neuroal.config.build", "allocation"), ("neuroal.config.build", "models"),
    ("neuroal.config.build", "recovery"), ("neuroal.config.build", "engine"),
}


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_names()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _existing(name: str) -> str:
    """The longest prefix of ``name`` that is a module (``a.b.func`` -> ``a.b``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The neuroal modules a statement of ``module`` makes Python import, its targets'
    ancestor packages included; an ancestor of ``module`` itself only when the statement
    takes a name defined in that package's ``__init__`` (which must then have finished)."""
    if isinstance(node, ast.Import):
        targets = [(_existing(a.name), False) for a in node.names
                   if a.name.split(".")[0] == "neuroal"]
    else:
        if node.level:
            base = module.split(".") if _is_package(module) else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != "neuroal":
            return set()
        targets = []
        for alias in node.names:
            full = f"{source}.{alias.name}"
            targets.append((full, False) if full in MODULES else (_existing(source), True))
    out: set[str] = set()
    for target, takes_name in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            ancestor = ".".join(parts[:i])
            own = module == ancestor or module.startswith(ancestor + ".")
            if not own or (ancestor == target and takes_name and ancestor != module):
                out.add(ancestor)
    return out


def statements(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that runs, with whether it sits inside a function
    (``if TYPE_CHECKING:`` blocks never run and are skipped)."""

    def walk(node: ast.AST, local: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from walk(ast.Module(body=child.orelse, type_ignores=[]), local)
            else:
                yield from walk(child, local or isinstance(
                    child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from walk(tree, False)


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Module-level import edges, and every function-local neuroal import (module, target,
    line)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    local = []
    for name, path in MODULES.items():
        for node, inside in statements(ast.parse(path.read_text(), str(path))):
            targets = imported(name, node) - {name}
            if inside:
                local += [(name, t, node.lineno) for t in targets if t != "neuroal"]
            else:
                graph[name] |= targets
    return graph, local


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_module_level_imports_are_acyclic() -> None:
    graph, _ = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_cycles() -> None:
    """The checks above can fail: a package importing a name its submodule also takes from it,
    and a plain two-module loop, are both found."""
    loop = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(loop) == ["a", "b", "c", "a"]
    node = ast.parse("from neuroal.allocation import ALLOCATIONS").body[0]
    assert "neuroal.allocation" in imported("neuroal.allocation.neuroal", node)
    sub = ast.parse("from neuroal.allocation.registry import ALLOCATIONS").body[0]
    assert imported("neuroal.allocation.neuroal", sub) == {"neuroal.allocation.registry"}


def test_no_function_local_neuroal_imports_outside_the_allowlist() -> None:
    _, local = import_graph()
    stray = sorted(f"{m}:{line} imports {t}" for m, t, line in local
                   if (m, t) not in LAZY_ALLOWED)
    assert not stray, ("function-local imports of neuroal modules hide import cycles; import at "
                       "module level (or move the shared code down): " + "; ".join(stray))
    used = {(m, t) for m, t, _ in local}
    assert LAZY_ALLOWED <= used, f"stale allowlist entries: {sorted(LAZY_ALLOWED - used)}"


def test_leaf_modules_import_nothing_higher() -> None:
    graph, local = import_graph()
    assert LEAVES <= set(MODULES)
    for leaf in sorted(LEAVES - {"neuroal"}):
        higher = sorted(graph[leaf] - LEAVES) + sorted(t for m, t, _ in local if m == leaf)
        assert not higher, f"leaf module {leaf} imports higher modules {higher}"
    assert graph["neuroal"] <= LEAVES, graph["neuroal"]


def floor_of(module: str) -> int | None:
    """The floor of a module (its index in FLOORS), len(FLOORS) for the top, None if unknown."""
    if module in TOP or module.split(".")[1:2] and module.split(".")[1] in TOP_GROUPS:
        return len(FLOORS)
    group = module.split(".")[1] if module.count(".") >= 1 else ""
    return FLOORS.index(group) if group in FLOORS else None


def test_every_module_belongs_to_a_group() -> None:
    """The root holds only the public API, the CLI and the pipeline; everything else lives in
    one of the groups."""
    loose = sorted(m for m in MODULES if floor_of(m) is None)
    assert not loose, f"modules outside every group (add them to one): {loose}"


def test_no_module_reaches_up_across_groups() -> None:
    graph, _ = import_graph()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if t != "neuroal" and floor_of(t) > floor_of(m)
                    and (m, t.split(".")[1]) not in UPWARD_ALLOWED)
    assert not upward, ("imports must point down the floors " + " < ".join(FLOORS)
                        + "; move the shared code down instead: " + "; ".join(upward))
    used = {(m, t.split(".")[1]) for m, targets in graph.items() for t in targets
            if t != "neuroal" and floor_of(t) > floor_of(m)}
    assert UPWARD_ALLOWED <= used, f"stale exceptions: {sorted(UPWARD_ALLOWED - used)}"


def test_the_floor_rule_can_fail() -> None:
    assert floor_of("neuroal.runtime.errors") < floor_of("neuroal.engine.worker")
    assert floor_of("neuroal.outputs.safety") < floor_of("neuroal.pipeline")
    assert floor_of("neuroal.somewhere_new") is None


def test_old_module_paths_import_with_a_deprecation_warning() -> None:
    """Every moved path still imports for one release, as the very module of its new path,
    and says where it went."""
    from neuroal.runtime.moved import MOVED

    code = ("import importlib, sys, warnings\n"
            "warnings.simplefilter('error', DeprecationWarning)\n"
            "import neuroal\n"
            "for old, new in dict(a.split('=') for a in sys.argv[1:]).items():\n"
            "    try:\n"
            "        importlib.import_module(old)\n"
            "    except DeprecationWarning as w:\n"
            "        assert new in str(w), (old, str(w))\n"
            "    else:\n"
            "        raise SystemExit(f'{old}: no warning')\n"
            "    warnings.simplefilter('ignore', DeprecationWarning)\n"
            "    assert importlib.import_module(old) is importlib.import_module(new), old\n"
            "    warnings.simplefilter('error', DeprecationWarning)\n")
    assert all(new in MODULES for new in MOVED.values())
    assert not set(MOVED) & set(MODULES), "an old path is still a module of its own"
    proc = subprocess.run([sys.executable, "-c", code, *(f"{o}={n}" for o, n in MOVED.items())],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for key in [k for k in sys.modules if k == "neuroal" or k.startswith("neuroal.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, in an interpreter without any neuroal module loaded (the
    neuroal modules are dropped between imports; torch and the other libraries stay loaded,
    which keeps this one subprocess fast)."""
    names = sorted(MODULES)
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_import_neuroal_stays_light() -> None:
    """``import neuroal`` (the console script's dispatcher, plug-ins) loads no torch."""
    code = "import sys, neuroal; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


def test_engine_and_pipeline_need_no_optional_packages() -> None:
    """The GPU check (launch/gpu_check.sh) runs on images with only torch, transformers and
    safetensors: importing the pipeline and every executor pulls in no Ray, GGUF or DeepSpeed
    (each is read on first use; lm-eval, the zero-shot adapter's base class, is imported where
    installed and replaced by ``object`` where not)."""
    code = ("import sys, neuroal.pipeline, neuroal.engine.dist, neuroal.engine.executor, "
            "neuroal.engine.onload, neuroal.planning, neuroal.commands.evaluate\n"
            "bad = [m for m in ('ray', 'gguf', 'deepspeed') if m in sys.modules]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
