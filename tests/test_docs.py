"""The ```python blocks of README.md and docs/*.md against the code, without running them.

Each block must parse; every name it reads must be bound in the block (imports, assignments,
function arguments) or be one of the placeholders the page's prose stands for (listed below,
per block); every ``module.attribute`` it reaches from an imported vijax module must exist;
and every call of a vijax function or class must bind to its signature (argument count and
keyword names). This catches the drift that breaks a reader's copy-paste (a renamed function
or keyword, a missing import) at no compile cost.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]

# Names a block reads without defining: the page's prose says what they stand for. Keyed by
# (page, first code line of the block); a block not listed here may use no free names.
PLACEHOLDERS = {
    ("README.md", "import distrax, jax, jax.numpy as jnp"): {"encoder", "log_likelihood", "log_prior"},
    ("docs/index.md", "import distrax, jax.numpy as jnp"): {"encoder", "log_likelihood", "log_prior"},
    ("docs/elbo.md", "import distrax, jax, jax.numpy as jnp"): {
        "loc", "scale", "x", "log_p_x_given_z", "log_p_z", "log_likelihood_fn", "prior", "rng_key"},
    ("docs/em.md", "import jax, jax.numpy as jnp"): {"data", "x_new", "q", "weights", "means",
                                                      "covariances"},
    ("docs/meanfield.md", "from vijax import meanfield"): {"update_fns", "state", "data", "elbo_fn"},
    ("docs/meanfield.md", "import jax"): {"x"},
    ("docs/svi.md", "import distrax, jax, jax.numpy as jnp, optax"): {"x", "y", "D"},
    ("docs/svi.md", "import jax, jax.numpy as jnp, optax"): {"x", "y"},
    ("docs/vae_engine.md", "import jax, optax"): {"train_images", "test_images", "num_epochs", "key",
                                                  "key_is", "key_b"},
    ("docs/discrete.md", "from vijax import discrete, elbo"): {"logits", "log_likelihood"},
}


def _blocks():
    for page in PAGES:
        text = (ROOT / page).read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            line = text[: match.start()].count("\n") + 2
            code = match.group(1)
            yield pytest.param(page, line, code, id=f"{page}:{line}")


BLOCKS = list(_blocks())


def test_there_are_blocks_and_every_placeholder_entry_is_used():
    keys = {(page, code.splitlines()[0]) for page, _, code in (b.values for b in BLOCKS)}
    assert len(BLOCKS) >= 6
    assert set(PLACEHOLDERS) <= keys, set(PLACEHOLDERS) - keys


class _Bindings(ast.NodeVisitor):
    """Names bound anywhere in the block (scopes flattened: enough for snippets)."""

    def __init__(self):
        self.bound: set[str] = set()
        self.loaded: list[tuple[str, int]] = []

    def visit_Name(self, node):
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self.bound.add(node.id)
        else:
            self.loaded.append((node.id, node.lineno))

    def visit_arg(self, node):
        self.bound.add(node.arg)

    def visit_FunctionDef(self, node):
        self.bound.add(node.name)
        self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            self.bound.add((alias.asname or alias.name).split(".")[0])

    visit_ImportFrom = visit_Import


def _import_namespace(tree: ast.Module) -> dict:
    namespace: dict = {}
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    exec(compile(ast.Module(body=imports, type_ignores=[]), "<doc imports>", "exec"), namespace)
    return namespace


def _resolve(node: ast.AST, namespace: dict):
    """The object an ``a.b.c`` chain rooted at an imported vijax module names, or None when the
    chain starts elsewhere. Raises AttributeError for a missing attribute."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in namespace:
        return None
    obj = namespace[node.id]
    if not getattr(obj, "__name__", "").startswith("vijax") and not (
            inspect.isclass(obj) and obj.__module__.startswith("vijax")):
        return None
    for part in reversed(parts):
        if inspect.ismodule(obj) and not hasattr(obj, part):  # a submodule not yet imported
            try:
                importlib.import_module(f"{obj.__name__}.{part}")
            except ModuleNotFoundError:
                pass
        obj = getattr(obj, part)  # AttributeError: the doc names something that is not there
    return obj


@pytest.mark.parametrize(("page", "line", "code"), BLOCKS)
def test_doc_block_matches_the_api(page, line, code):
    tree = ast.parse(code, filename=f"{page}:{line}")  # SyntaxError fails the test

    visitor = _Bindings()
    visitor.visit(tree)
    allowed = PLACEHOLDERS.get((page, code.splitlines()[0]), set())
    free = {name for name, _ in visitor.loaded
            if name not in visitor.bound and not hasattr(builtins, name)}
    assert free <= allowed, f"{page}:{line}: names used but not defined: {sorted(free - allowed)}"

    namespace = _import_namespace(tree)
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            try:
                _resolve(node, namespace)
            except AttributeError as error:
                pytest.fail(f"{page}:{line + node.lineno - 1}: {ast.unparse(node)}: {error}")
        if isinstance(node, ast.Call):
            target = _resolve(node.func, namespace)
            if not callable(target) or any(isinstance(a, ast.Starred) for a in node.args) or any(
                    k.arg is None for k in node.keywords):
                continue
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):
                continue
            try:
                signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
            except TypeError as error:
                pytest.fail(f"{page}:{line + node.lineno - 1}: {ast.unparse(node)}: {error}")
            checked += 1
    if "vijax" in code:
        assert checked > 0, f"{page}:{line}: no vijax call was checked"
