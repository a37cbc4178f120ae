"""The project's import graph, read with ``ast`` (nothing is imported): every module of ``igpt/`` and of the five
stage folders, with its top-level imports, its lazy imports inside functions and its
``importlib.import_module("…")`` / ``__import__("…")`` calls with constant names.

- No import cycle between modules, lazy imports included (imports under ``if TYPE_CHECKING:`` never run, so
  they do not count for cycles).
- Stages are layered; a module may import its own stage and earlier ones only, in this order:
  foundation (``igpt``, ``igpt.errors``, ``igpt.runner``) < ``igpt.data_pipeline`` < ``igpt.kernels`` <
  ``igpt.pretrain`` < ``igpt.evals`` < ``igpt.cluster`` < top (``igpt.demo``, ``igpt.cli``, ``igpt.__main__``).
- Nothing uses the old top-level names (``data_pipeline``, ``kernels``, ``pretrain``, ``evals``, ``cluster``,
  ``igpt_cli``): not the modules, tests, benchmarks and scripts (imports and string constants), not the shell
  scripts, the Makefile or the cluster templates, not the commands the cluster launchers generate. The one
  allowed ``import kernels`` is tests/test_wheel.py's check that it finds Hugging Face's package.
"""
from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGE_FOLDERS = ("data_pipeline", "kernels", "pretrain", "evals", "cluster")
OLD_NAMES = (*STAGE_FOLDERS, "igpt_cli")
# (name, modules): a name ending in "." is a package prefix, any other an exact module.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("igpt", "igpt.errors", "igpt.runner")),
    *((folder, (f"igpt.{folder}.",)) for folder in STAGE_FOLDERS),
    ("top", ("igpt.demo", "igpt.cli", "igpt.__main__")),
]
OLD = "|".join(STAGE_FOLDERS)
# Old names in text: string constants of Python files, shell scripts, templates, generated commands.
OLD_USES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bigpt_cli\b"), "igpt_cli (now igpt.cli, python -m igpt)"),
    (re.compile(rf"-m\s+(?:{OLD})\b"), "python -m with an old top-level name"),
    (re.compile(rf"(?<![\w.])(?:from|import)\s+(?:{OLD})(?![\w/-])"), "an import of an old top-level name"),
    (re.compile(rf"\bpython3?\s+(?:\S+/)?(?:{OLD})/\w+\.py\b"), "a stage module run as a file"),
]
# A whole string constant that names a module under an old top-level name, e.g. "kernels.flash_attention"
# (one whose igpt.… counterpart is a module; "evals.json" is a file name).
OLD_MODULE_STRING = re.compile(rf"(?:{OLD})(?:\.\w+)+")
ALLOWED = {("tests/test_wheel.py", "import kernels")}  # the wheel test asserts this is Hugging Face's kernels
SELF = Path(__file__).resolve()  # its patterns name the old names
SHELL_FILES = sorted([*(REPO / "scripts").glob("*.sh"), REPO / "Makefile", *(REPO / "cluster" / "templates").glob("*")])


@dataclass(frozen=True)
class Import:
    """One import in a file: the absolute dotted name it imports (``from a import b`` → ``a.b``)."""

    file: str  # relative to REPO
    line: int
    name: str
    top: str  # the top-level name the import statement resolves first
    lazy: bool  # inside a function
    dynamic: bool  # importlib.import_module / __import__ with a constant name
    typing_only: bool  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        kind = "import_module" if self.dynamic else "lazy" if self.lazy else "TYPE_CHECKING" if self.typing_only else ""
        return f"{self.file}:{self.line}" + (f" ({kind})" if kind else "")


def module_name(path: Path) -> str:
    """``pretrain/train.py`` → ``igpt.pretrain.train``, ``igpt/cli.py`` → ``igpt.cli``,
    ``igpt/__init__.py`` → ``igpt``."""
    parts = path.relative_to(REPO).with_suffix("").parts
    parts = parts if parts[0] == "igpt" else ("igpt", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def project_files() -> dict[str, Path]:
    """Every module of the project by name."""
    paths = [*(REPO / "igpt").glob("*.py"), *(p for f in STAGE_FOLDERS for p in (REPO / f).rglob("*.py"))]
    return {module_name(p): p for p in sorted(paths) if "__pycache__" not in p.parts}


class _Collector(ast.NodeVisitor):
    """The imports of one parsed file (``package``: the package relative imports start from, if any)."""

    def __init__(self, file: str, package: str | None) -> None:
        self.file, self.package = file, package
        self.depth = 0
        self.typing = 0
        self.found: list[Import] = []

    def _add(self, node: ast.AST, name: str, top: str, dynamic: bool = False) -> None:
        self.found.append(Import(self.file, node.lineno, name, top, self.depth > 0, dynamic, self.typing > 0))

    def _scope(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        typing = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        self.visit(node.test)
        self.typing += typing
        for child in node.body:
            self.visit(child)
        self.typing -= typing
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            assert self.package, f"{self.file}:{node.lineno}: a relative import outside the project's packages"
            anchor = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            self._add(node, base if alias.name == "*" else f"{base}.{alias.name}".lstrip("."), base.split(".")[0])

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
            self._add(node, node.args[0].value, node.args[0].value.split(".")[0], dynamic=True)
        self.generic_visit(node)


def collect(source: str, file: str, package: str | None = None) -> list[Import]:
    """The imports in ``source``."""
    collector = _Collector(file, package)
    collector.visit(ast.parse(source, file))
    return collector.found


def file_imports(path: Path) -> list[Import]:
    """The imports of a file of the checkout (a project module resolves its relative imports)."""
    rel = path.relative_to(REPO)
    package = None
    if path in project_files().values():
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return collect(path.read_text(), str(rel), package)


def resolve(name: str, modules: set[str]) -> str | None:
    """The project module an imported name loads last: itself, or its longest prefix that is a module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def layer(module: str) -> int | None:
    """The position of ``module``'s layer in LAYERS, or None for a module of no layer."""
    for rank, (_, members) in enumerate(LAYERS):
        if any(module.startswith(m) if m.endswith(".") else module == m for m in members):
            return rank
    return None


def graph() -> dict[str, dict[str, list[Import]]]:
    """module → imported project module → the imports that make the edge (self-imports left out)."""
    files = project_files()
    edges: dict[str, dict[str, list[Import]]] = {m: {} for m in files}
    for module, path in files.items():
        for imp in file_imports(path):
            target = resolve(imp.name, set(files))
            if target is not None and target != module:
                edges[module].setdefault(target, []).append(imp)
    return edges


def cycles(edges: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module (Tarjan, then a BFS)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        start, members = component[0], set(component)
        paths = deque([[start]])
        while paths:
            path = paths.popleft()
            if len(path) > 1 and path[-1] == start:
                found.append(path)
                break
            paths.extend([*path, w] for w in sorted(edges[path[-1]]) if w in members and (w == start or w not in path))
    return found


def _runtime(edges: dict[str, dict[str, list[Import]]]) -> dict[str, dict[str, list[Import]]]:
    return {m: {t: [i for i in imps if not i.typing_only] for t, imps in out.items()
                if any(not i.typing_only for i in imps)} for m, out in edges.items()}


def _sites(imports: list[Import]) -> str:
    return ", ".join(dict.fromkeys(i.where() for i in imports))


def old_uses_in_text(text: str, file: str) -> list[str]:
    """``file:line: what`` for every old-name pattern in ``text`` (not ALLOWED)."""
    found = []
    for pattern, what in OLD_USES:
        for match in pattern.finditer(text):
            if (file, match.group()) not in ALLOWED:
                found.append(f"{file}:{text.count(chr(10), 0, match.start()) + 1}: {what}: {match.group()!r}")
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                          ast.AsyncFunctionDef))]
    return {id(n.body[0].value) for n in nodes if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)}


def python_files() -> list[Path]:
    """The project's modules, tests, benchmarks and scripts."""
    extra = [*(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]
    return sorted({*project_files().values(), *extra})


def test_the_collector_sees_top_level_lazy_relative_and_dynamic_imports() -> None:
    source = ("import os, igpt.pretrain.train\nfrom . import config\nfrom ..data_pipeline.io import write_json\n"
              "if TYPE_CHECKING:\n    from igpt.evals import nll\n"
              "def f():\n    from igpt.kernels import reference\n    import importlib\n"
              "    return importlib.import_module('igpt.kernels.flash_attention'), __import__('kernels')\n")
    found = {(i.name, i.top, i.lazy, i.dynamic, i.typing_only) for i in collect(source, "x.py", "igpt.pretrain")}
    assert found == {("os", "os", False, False, False), ("igpt.pretrain.train", "igpt", False, False, False),
                     ("igpt.pretrain.config", "igpt", False, False, False),
                     ("igpt.data_pipeline.io.write_json", "igpt", False, False, False),
                     ("igpt.evals.nll", "igpt", False, False, True),
                     ("igpt.kernels.reference", "igpt", True, False, False),
                     ("importlib", "importlib", True, False, False),
                     ("igpt.kernels.flash_attention", "igpt", True, True, False),
                     ("kernels", "kernels", True, True, False)}


def test_every_module_has_a_layer_and_the_graph_sees_the_dynamic_imports() -> None:
    modules = project_files()
    assert {"igpt", "igpt.cli", "igpt.__main__", "igpt.pretrain.train", "igpt.cluster.slurm"} <= set(modules)
    assert [m for m in modules if layer(m) is None] == []
    dynamic = [i for p in python_files() for i in file_imports(p) if i.dynamic]
    # benchmarks/attention.py's importlib.import_module("igpt.kernels.flash_attention"), four times
    assert len(dynamic) >= 4 and {i.name for i in dynamic} >= {"igpt.kernels.flash_attention"}


def test_no_import_cycle() -> None:
    edges = _runtime(graph())
    report = [" -> ".join(cycle) + "\n    " + "\n    ".join(f"{a} -> {b}: {_sites(edges[a][b])}"
                                                              for a, b in zip(cycle, cycle[1:]))
              for cycle in cycles(edges)]
    assert not report, "import cycles:\n" + "\n".join(report)


def test_no_stage_imports_a_later_stage() -> None:
    names = {rank: name for rank, (name, _) in enumerate(LAYERS)} | {None: "no layer"}
    report = [f"{module} ({names[layer(module)]}) imports {target} ({names[layer(target)]}): {_sites(imports)}"
              for module, out in sorted(graph().items()) for target, imports in sorted(out.items())
              if layer(target) is None or layer(module) is None or layer(target) > layer(module)]
    assert not report, "imports of a later stage:\n" + "\n".join(report)


def test_no_python_file_imports_or_names_an_old_top_level_name() -> None:
    modules = set(project_files())
    report = []
    for path in python_files():
        rel = str(path.relative_to(REPO))
        report += [f"{i.where()}: imports {i.name!r} (top-level {i.top!r})" for i in file_imports(path)
                   if i.top in OLD_NAMES and (rel, f"import {i.top}") not in ALLOWED]
        if path == SELF:
            continue
        tree = ast.parse(path.read_text(), rel)
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                report += [f"{rel}:{node.lineno}: {use.split(': ', 1)[1]}" for use in old_uses_in_text(node.value, rel)]
                if OLD_MODULE_STRING.fullmatch(node.value) and f"igpt.{node.value}" in modules:
                    report.append(f"{rel}:{node.lineno}: a module under an old top-level name: {node.value!r}")
    assert not report, "old top-level names in Python files:\n" + "\n".join(report)


def test_shell_scripts_and_templates_run_igpt_by_its_package() -> None:
    modules = set(project_files())
    report = []
    for path in SHELL_FILES:
        rel, text = str(path.relative_to(REPO)), path.read_text()
        report += old_uses_in_text(text, rel)
        for match in re.finditer(r"-m\s+([\w.]+)", text):
            name = match.group(1)
            if name.split(".")[0] == "igpt" and name not in modules:
                report.append(f"{rel}:{text.count(chr(10), 0, match.start()) + 1}: -m {name} is not an igpt module")
    assert not report, "\n".join(report)


def test_generated_commands_run_igpt_by_its_package() -> None:
    from igpt.cluster.command import igpt_args, python_igpt
    from igpt.cluster.ray_job import RayJob, entrypoint
    from igpt.cluster.slurm import SlurmJob, render_sbatch

    train = ["configs/cifar10-cpu-tiny.yaml", "train.steps=2"]
    generated = {
        "slurm train": render_sbatch(SlurmJob(command=python_igpt("python3", igpt_args(train)))),
        "slurm ray cluster": render_sbatch(SlurmJob(command=[], ray_cluster=True)),
        "ray train": entrypoint(RayJob(command=train, address="http://head:8265", working_dir=None)),
        "ray eval": entrypoint(RayJob(command=["eval", "nll", "--checkpoint", "r", "--data", "d"],
                                      address="http://head:8265", working_dir=None)),
    }
    report = [use for name, text in generated.items() for use in old_uses_in_text(text, name)]
    assert not report, "\n".join(report)
    assert all("igpt.cli" in text or "-m igpt." in text
               for name, text in generated.items() if name != "slurm ray cluster")
