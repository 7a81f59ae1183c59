"""The flat layout holds: every top-level module is packaged, no module reaches another's private
names, and the module-level imports between the project's modules form no cycle."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def _tree(name: str) -> ast.Module:
    return ast.parse((ROOT / f"{name}.py").read_text(), filename=f"{name}.py")


def test_pyproject_packages_every_top_level_module() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(config["tool"]["setuptools"]["py-modules"]) == MODULES
    assert config["project"]["scripts"]["discover"] == "discover:cli"


def test_no_module_uses_another_modules_private_names() -> None:
    bad = []
    for name in MODULES:
        for node in ast.walk(_tree(name)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in MODULES
                    and node.value.id != name and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{name}.py:{node.lineno}: {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in MODULES:
                bad += [f"{name}.py:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_")]
    assert bad == []


def test_module_level_imports_form_no_cycle() -> None:
    graph = {}
    for name in MODULES:
        deps = set()
        for node in _tree(name).body:  # module level only: an import inside a function runs on use
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in MODULES}
            elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
                deps.add(node.module)
        graph[name] = deps - {name}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in graph[n]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path + [n, d])}"
            if d not in state:
                visit(d, path + [n])
        state[n] = 2

    for n in MODULES:
        if n not in state:
            visit(n, [])


def test_no_function_shadows_a_project_module_it_uses() -> None:
    """A parameter or local named like a project module (``models``, ``probes``) hides the module
    inside that function: ``models.build`` there is an attribute of the local."""
    bad = []
    for path in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            local = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
            local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for mod in local & set(MODULES):
                used = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name) and n.value.id == mod}
                module_names = {a for a in dir(__import__(mod)) if not a.startswith("__")}
                if used & module_names - {"items", "split", "keys", "values", "get", "append"}:
                    bad.append(f"{path.name}:{fn.lineno} {fn.name}: {mod} ({', '.join(sorted(used))})")
    assert bad == []


def _message_texts(node: ast.Call) -> list[str]:
    """The literal text of an error's message (the constant parts of its f-strings)."""
    return [n.value for arg in node.args for n in ast.walk(arg) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_library_errors_name_arguments_and_the_cli_turns_them_into_flags() -> None:
    """Library code speaks of arguments (```batch_size```), never of flags (``--batch-size``); every
    argument an error names is an option of the CLI, which prints it as that option's flag."""
    import re

    import discover

    flags = discover.option_flags(discover.cli)
    flag_words, unknown = [], []
    for name in MODULES:
        if name == "discover":
            continue
        for node in ast.walk(_tree(name)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DiscoverError":
                for text in _message_texts(node):
                    command = re.sub(r"python discover\.py [^`]*", "", text)  # a command to run has flags
                    flag_words += [f"{name}.py:{node.lineno}: {w}" for w in re.findall(r"--[a-z][a-z-]*", command)]
                    unknown += [f"{name}.py:{node.lineno}: {w}" for w in re.findall(r"`([A-Za-z_]\w*)`", text)
                                if w not in flags]
    assert flag_words == [] and unknown == []
    assert flags["batch_size"] == "--batch-size" and flags["U"] == "--U" and flags["skip_bad"] == "--skip-bad"
    assert (discover.in_flags("`batch_size` must be >= 1; pass `force` (`weights` stays)",
                              {"batch_size": "--batch-size", "force": "--force"})
            == "--batch-size must be >= 1; pass --force (`weights` stays)")
