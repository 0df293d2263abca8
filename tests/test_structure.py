"""The package's dependencies run one way (DESIGN.md, README "Layout"):

    pytree, axes  ←  ops  ←  sharding  ←  layers  ←  models  ←  inference, train, distill, interop, rl  ←  CLI, experiments
    (distill uses train; rl uses inference and train)
    data: ops only.   pallas_kernels: jax only (ops reaches it lazily for impl="pallas").

Every import in every module counts, including imports inside functions (a lazy import is still a
dependency). The test also fails on an import cycle between modules.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOWER = {   # what each part of mamba_jax may import (besides itself)
    "pytree": set(),
    "axes": set(),
    "bench_utils": set(),
    "ops": {"pallas_kernels"},
    "data": {"ops"},
    "sharding": {"ops", "axes", "pytree", "pallas_kernels"},
    "layers": {"ops", "axes", "pytree", "sharding"},
    "models": {"layers", "ops", "axes", "pytree", "sharding"},
    "inference": {"models", "layers", "ops", "axes", "pytree", "sharding"},
    "train": {"models", "layers", "ops", "axes", "pytree", "sharding", "data"},
    "distill": {"train", "models", "layers", "ops", "axes", "pytree", "sharding", "data"},
    "interop": {"models", "layers", "ops", "axes", "pytree", "sharding"},
    "rl": {"inference", "train", "models", "layers", "ops", "axes", "pytree", "sharding", "data"},
}
CLI = {"cli", "aot"}   # the command line sits with the experiments, above everything


def modules(package):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def imported(path, module):
    """Every module name `path` imports, anywhere in the file (relative imports resolved)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)   # `from pkg import submodule`
    return out


def part(name):
    """The part of the project a module name belongs to: 'ops', 'layers', ... or 'experiments'."""
    pieces = name.split(".")
    if pieces[0] == "mamba_jax":
        return pieces[1] if len(pieces) > 1 else "mamba_jax"
    return pieces[0]


def graph():
    known = dict(modules("mamba_jax"))
    known.update(modules("pallas_kernels"))
    return {m: {i for i in imported(p, m) if i in known} | {i for i in imported(p, m) if part(i) == "experiments"}
            for m, p in known.items()}


def violations(edges):
    bad = []
    for module, targets in edges.items():
        src = part(module)
        for target in targets:
            dst = part(target)
            if dst == src or module.split(".")[0] == "mamba_jax" and dst == "mamba_jax":
                continue
            if module.startswith("pallas_kernels"):
                if dst != "pallas_kernels":
                    bad.append(f"{module} -> {target} (pallas_kernels depends on jax only)")
            elif src in CLI:
                continue
            elif dst == "experiments" or dst not in LOWER.get(src, set()):
                bad.append(f"{module} -> {target} ({src} may import {sorted(LOWER.get(src, set()))})")
    return sorted(bad)


def cycles(edges):
    """Module import cycles (explicit imports; a package's own __init__ importing its modules is not one)."""
    found, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if t == m or m.startswith(t + ".") or t.startswith(m + "."):   # package <-> its own modules
                continue
            if state.get(t) == 1:
                found.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    return found


def test_dependencies_run_one_way():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_ops_know_nothing_of_sharding():
    for module, path in modules("mamba_jax/ops"):
        assert not any(part(i) in ("sharding", "layers", "models") for i in imported(path, module)), module


@pytest.mark.parametrize("src, dst", [("mamba_jax.ops.ssd", "mamba_jax.sharding.kernels"),
                                      ("mamba_jax.layers.mamba", "mamba_jax.train.step"),
                                      ("mamba_jax.layers.mamba", "mamba_jax.models.lm"),
                                      ("mamba_jax.models.lm", "experiments.lm.config"),
                                      ("mamba_jax.data.text", "mamba_jax.models.lm"),
                                      ("pallas_kernels.ssd.kernel", "mamba_jax.ops.ssd")])
def test_a_forbidden_import_is_caught(src, dst):
    edges = graph()
    edges[src] = set(edges[src]) | {dst}
    assert any(v.startswith(f"{src} -> {dst}") for v in violations(edges))


def test_a_cycle_is_caught():
    edges = graph()
    edges["mamba_jax.interop.hf_common"] = set(edges["mamba_jax.interop.hf_common"]) | {"mamba_jax.interop.hf"}
    assert any("mamba_jax.interop.hf_common" in c for c in cycles(edges))
