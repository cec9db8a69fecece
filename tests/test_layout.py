"""Dependencies point one way: no import cycle between the kit's packages.

Every import in the package's source counts, the ones inside functions too
(a lazy import is still a dependency). A package is a module's folder:
``forge_lite.controller.service``, ``forge_lite.actors``, ``forge_lite.grpo``...
Also: the controller layer knows nothing about RL, the RL math (logits ->
logprobs -> advantages -> loss) lives in ``forge_lite/rl/``, and a file holds
one idea: none is over 500 lines unless its module docstring says why. A
learner imports from a few documented places (README, "What a learner
imports"), the notebooks too.
"""

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_from(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module of ``from X import ...``, relative imports resolved."""
    if node.level == 0:
        return node.module
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def package_of(module: str, packages: set[str]) -> str | None:
    """The deepest known package that holds ``module`` (or is it)."""
    candidates = [p for p in packages if module == p or module.startswith(p + ".")]
    return max(candidates, key=len) if candidates else None


def package_graph() -> dict[str, set[str]]:
    files = list(ROOT.glob("forge_lite/**/*.py"))
    packages = {module_name(f) for f in files if f.name == "__init__.py"}
    graph: dict[str, set[str]] = {p: set() for p in packages}
    for path in files:
        me = module_name(path)
        mine = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = imported_from(node, path)
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                theirs = package_of(target, packages)
                # A package's __init__ importing its own modules is not a dependency.
                if theirs and theirs != mine and not mine.startswith(theirs + "."):
                    graph[mine].add(theirs)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = "done", path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert {"forge_lite.actors", "forge_lite.grpo", "forge_lite.rl", "forge_lite.controller"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def module_graph() -> dict[str, set[str]]:
    """Module -> the kit's modules it imports (``from a import b`` names the
    submodule ``a.b`` when there is one, else the module ``a``)."""
    files = list(ROOT.glob("forge_lite/**/*.py"))
    modules = {module_name(f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in files:
        me = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = imported_from(node, path)
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules
                           else source for alias in node.names]
            else:
                continue
            graph[me] |= {t for t in targets if t in modules and t != me}
    return graph


def test_no_import_cycle_between_modules():
    graph = module_graph()
    # relative imports count (the dashboards' own modules import each other so)
    assert "forge_lite.widgets.throttle" in graph["forge_lite.widgets.service_dashboard"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_controller_layer_knows_nothing_about_rl():
    graph = package_graph()
    for package in ("forge_lite.controller", "forge_lite.controller.service", "forge_lite.controller.cluster"):
        rl = graph[package] & {"forge_lite.actors", "forge_lite.grpo", "forge_lite.rl", "forge_lite.data"}
        assert not rl, f"{package} imports {sorted(rl)}"


RL = ROOT / "forge_lite" / "rl"
# The operations each step of the math is made of, by the name it is called
# with (torch.log_softmax, F.log_softmax and tensor.log_softmax alike).
MATH_CALLS = {
    "log_softmax": "logits -> logprobs",
    "sample_std": "rewards -> advantages (the group's spread)",
    "expm1": "the k3 KL",
}
# Other ways to compute the same step, which belong in rl/ too: torch's std.
OTHER_MATH_CALLS = {"std": "rewards -> advantages (the group's spread)"}
# The math's functions: each defined once, in rl/ (a copy elsewhere would drift).
MATH_FUNCTIONS = ("causal_lm_logits", "response_logits", "token_logprobs", "response_logprobs",
                  "group_advantages", "k3_kl", "response_kl", "policy_loss", "grpo_loss")


def kit_files() -> list[Path]:
    return sorted(list(ROOT.glob("forge_lite/**/*.py")))


def called_name(call: ast.Call) -> str | None:
    """``f`` for ``f(...)``, ``x.f(...)`` and ``torch.nn.functional.f(...)``."""
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def test_the_rl_math_is_computed_only_in_rl():
    seen_in_rl, outside = set(), []
    for path in kit_files():
        for node in ast.walk(ast.parse(path.read_text())):
            name = called_name(node) if isinstance(node, ast.Call) else None
            what = MATH_CALLS.get(name) or OTHER_MATH_CALLS.get(name)
            if what is None:
                continue
            if path.is_relative_to(RL):
                seen_in_rl.add(name)
            else:
                outside.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {name} ({what})")
    # The scan finds each operation where it belongs: it would not pass by finding nothing.
    assert set(MATH_CALLS) <= seen_in_rl, f"not found under forge_lite/rl/: {set(MATH_CALLS) - seen_in_rl}"
    assert not outside, "the RL math belongs in forge_lite/rl/ (call it from there): " + "; ".join(outside)


def test_each_math_function_is_defined_once_in_rl():
    homes: dict[str, list[str]] = {name: [] for name in MATH_FUNCTIONS}
    for path in kit_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in homes:
                homes[node.name].append(str(path.relative_to(ROOT)))
    misplaced = {name: found for name, found in homes.items()
                 if len(found) != 1 or not found[0].startswith("forge_lite/rl/")}
    assert not misplaced, f"define each once, under forge_lite/rl/ (name: where defined now): {misplaced}"


LONG = 500  # lines: past this a file usually holds more than one idea
REASON = "Longer than 500 lines because"


def test_no_file_is_over_500_lines_without_a_reason_at_its_top():
    """A reader opens a file to learn one idea. A file past 500 lines is split
    into one file per idea, or its module docstring has a line saying
    "Longer than 500 lines because ..." (one idea that needs the room)."""
    files = sorted(ROOT.glob("forge_lite/**/*.py"))
    assert len(files) > 20, f"found only {len(files)} of the kit's files under {ROOT}"
    unexplained = []
    for path in files:
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > LONG and REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not unexplained, (
        f"over {LONG} lines, with no '{REASON} ...' in the module docstring: " + ", ".join(unexplained)
    )


# The re-exports of README's "What a learner imports": place -> {name: the module defining it}.
DOCUMENTED = {
    "forge_lite": {"LocalHosts": "forge_lite.local_hosts"},
    "forge_lite.controller.service": {
        **{name: "forge_lite.controller.service.events" for name in (
            "RequestRouted", "RequestFinished", "RequestRetried", "ReplicaStateChanged", "HostStateChanged",
            "SessionStarted", "SessionMoved", "SessionEnded", "ServiceStopped")},
        "Router": "forge_lite.controller.service.router",
    },
    "forge_lite.rl": {"response_logprobs": "forge_lite.rl.logprobs", "group_advantages": "forge_lite.rl.advantages",
                      "grpo_loss": "forge_lite.rl.loss"},
}
# The module paths behind them, which the notebooks do not import from.
DEEP = re.compile(r"from forge_lite\.(controller\.service\.(events|router)|grpo\.advantages|worker"
                  r"|rl\.(logprobs|advantages|loss)) import")


def test_a_learner_imports_from_a_few_documented_places():
    for place, names in DOCUMENTED.items():
        module = importlib.import_module(place)
        for name, home in names.items():
            assert getattr(module, name) is getattr(importlib.import_module(home), name), f"{place}.{name}"
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 6
    deep = [f"{notebook.name}: {line.strip()}"
            for notebook in notebooks for cell in json.loads(notebook.read_text())["cells"]
            if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines() if DEEP.search(line)]
    assert not deep, f"import these from the places README lists: {deep}"


def test_the_re_exports_load_nothing_until_used():
    """A worker process imports forge_lite, a RewardActor replica forge_lite.rl's
    package: neither pays for LocalHosts or torch until a name is used."""
    code = ("import sys, forge_lite, forge_lite.rl; "
            "print(sorted(m for m in ('torch', 'forge_lite.local_hosts') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
