"""The import graphs of `rewards/` and `scheduling/` have no cycle (imports inside functions
count too), and the reward registry resolves every built-in name without importing it."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (anywhere in its source, by ast)."""
    files = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / package).glob("*.py")}
    names = {m.removesuffix(".__init__") for m in files.values()}
    graph = {}
    for path, mod in files.items():
        mod = mod.removesuffix(".__init__")
        is_pkg = path.name == "__init__.py"
        base_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(base_parts[: len(base_parts) - node.level + 1])
                    origin = f"{base}.{node.module}" if node.module else base
                else:
                    origin = node.module
                # `from pkg import submodule` imports the submodule; `from pkg import name`, pkg
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in names else origin
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in names and t != mod}
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("package", ["rewards", "scheduling"])
def test_no_import_cycle(package):
    graph = module_imports(package)
    assert len(graph) > 5 and any(graph.values())  # the walk sees the package's own imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_registries_import_nothing_that_registers_into_them():
    rewards_graph, scheduling_graph = module_imports("rewards"), module_imports("scheduling")
    assert rewards_graph["rewards.registry"] == set()
    assert "rewards.registry" not in rewards_graph["rewards.builtin"]
    assert scheduling_graph["scheduling.base"] == {"scheduling.types"}
    assert {"scheduling.base", "scheduling.length_aware"} <= scheduling_graph["scheduling.policies"]


def test_every_builtin_reward_name_resolves_to_its_function():
    from rewards.registry import BUILTINS, lookup, registered_names

    assert set(BUILTINS) <= set(registered_names())
    for name, path in BUILTINS.items():
        assert lookup(name) == path
        module, function = path.split(":")
        assert callable(getattr(importlib.import_module(module), function)), path


def test_public_import_paths_still_work():
    import rewards
    import scheduling
    from scheduling.base import SchedulingPolicy, register_policy  # noqa: F401
    from scheduling.policies import LengthAwarePolicy, make_policy, policy_names

    assert scheduling.make_policy is make_policy and scheduling.policy_names is policy_names
    assert policy_names() == ["continuous", "full_group", "length_aware", "naive_micro"]
    assert isinstance(make_policy("length_aware", predictor="constant"), LengthAwarePolicy)
    assert rewards.register is importlib.import_module("rewards.registry").register
    assert "math_verify" in rewards.registered_names()
