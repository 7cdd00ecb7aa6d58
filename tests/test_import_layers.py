"""The package's import graph: no module imports one that imports it back (issue 20).

Counted are all imports, at module level and inside functions: a circle through a lazy import
still ties two modules together and breaks when either is moved to the top of the file.
"""

from __future__ import annotations

from pathlib import Path

from import_graph import PKG, import_targets


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _graph() -> dict[str, set[str]]:
    names = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps: set[str] = set()
        for mod, imported in import_targets(path):
            found = [mod, *(f"{mod}.{n}" for n in imported)]  # from pkg import submodule
            deps.update(m for m in found if m in names and m != name)
        graph[name] = deps
    return graph


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    circles = [sorted(c) for c in _circles(_graph())]
    assert not circles, circles


def test_class_map_and_datasets_do_not_import_each_other():
    g = _graph()
    assert "md_plugin.data.datasets" not in g["md_plugin.data.class_map"]
    assert "md_plugin.data.targets" in g["md_plugin.data.class_map"]


def test_the_base_modules_import_no_package_above_them():
    """config, cli_common, files, rundir, checkpoint: shared by train/, splitter/ and cli.py."""
    g = _graph()
    for base in ("config", "cli_common", "files", "rundir", "checkpoint", "artifacts", "errors"):
        above = {m for m in g[f"md_plugin.{base}"] if m.startswith(("md_plugin.train",
                                                                     "md_plugin.splitter",
                                                                     "md_plugin.cli"))}  # fmt: skip
        assert not above, (base, above)


def test_the_trainer_phases_do_not_import_the_entry_point():
    """The baseline run calls main(): it is driven from main.py, so no phase imports main."""
    g = _graph()
    assert [m for m, deps in g.items() if "md_plugin.train.main" in deps] == []


def test_the_trainer_and_the_splitter_stand_side_by_side():
    """docs/architecture.md: train/ and splitter/ never import each other; the methods
    (doctor/, splitter/) and the building blocks never import a command."""
    g = _graph()

    def deps(prefix: str) -> set[str]:
        return {d for m, ds in g.items() if m.startswith(prefix) for d in ds}

    assert not {d for d in deps("md_plugin.splitter") if d.startswith("md_plugin.train")}
    assert not {d for d in deps("md_plugin.train") if d.startswith("md_plugin.splitter")}
    commands = ("md_plugin.train", "md_plugin.cli", "md_plugin.task", "md_plugin.splitter.cli",
                "md_plugin.splitter.patch_cli")  # fmt: skip
    for pkg in ("md_plugin.doctor", "md_plugin.layers", "md_plugin.data", "md_plugin.losses",
                "md_plugin.report", "md_plugin.annotate", "md_plugin.models"):  # fmt: skip
        bad = {d for d in deps(pkg) if d.startswith(commands) and d != "md_plugin.cli_common"}
        assert not bad, (pkg, bad)
