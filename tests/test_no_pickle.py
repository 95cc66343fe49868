"""Nothing executable from outside: no code in ``src/`` can unpickle or evaluate what it reads.

The scan reads the syntax tree, so comments and docstrings that explain a refusal are fine,
while ``import pickle``, ``torch.load(...)``, ``np.load(..., allow_pickle=True)``, a bare
``eval(`` / ``exec(`` and their aliases are not. ``model.eval()`` is a method, not the builtin.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
#: modules whose loading runs code embedded in the data
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}
#: attribute calls that unpickle: (object name, attribute)
UNSAFE_CALLS = {
    ("torch", "load"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("np", "load"),  # only with allow_pickle=True, see below
    ("numpy", "load"),
}
UNSAFE_BUILTINS = {"eval", "exec", "__import__"}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def violations(source: str, filename: str = "<string>") -> list[str]:
    """Every unsafe deserialisation or evaluation in ``source`` as ``file:line: what``."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in UNSAFE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            for alias in node.names:
                if (module, alias.name) in UNSAFE_CALLS and module not in ("np", "numpy"):
                    found.append(f"{where}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS:
                found.append(f"{where}: {func.id}(...)")
            if isinstance(func, ast.Attribute):
                owner = _name(func.value)
                if (owner, func.attr) in UNSAFE_CALLS:
                    if owner in ("np", "numpy"):
                        pickles = any(
                            k.arg == "allow_pickle"
                            and not (isinstance(k.value, ast.Constant) and not k.value.value)
                            for k in node.keywords
                        )
                        if pickles:
                            found.append(f"{where}: {owner}.load(..., allow_pickle=...)")
                    else:
                        found.append(f"{where}: {owner}.{func.attr}(...)")
                if func.attr in UNSAFE_BUILTINS and owner == "builtins":
                    found.append(f"{where}: builtins.{func.attr}(...)")
        elif isinstance(node, ast.Attribute) and _name(node.value) in UNSAFE_MODULES:
            found.append(f"{where}: {_name(node.value)}.{node.attr}")
    return found


def test_src_never_unpickles_or_evaluates() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"expected the package sources under {SRC}"
    found = [v for f in files for v in violations(f.read_text("utf-8"), str(f.relative_to(SRC)))]
    assert not found, "unsafe deserialisation or evaluation in src/:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        "import pickle",
        "import joblib as jl",
        "from pickle import loads",
        "from dill import load",
        "import torch\nstate = torch.load(path)",
        "import torch\nstate = torch.load(path, weights_only=True)",
        "from torch import load",
        "import numpy as np\nx = np.load(p, allow_pickle=True)",
        "import numpy\nx = numpy.load(p, allow_pickle=flag)",
        "eval(text)",
        "exec(compile(text, 'f', 'exec'))",
        "import builtins\nbuiltins.eval(text)",
        "__import__(name)",
        "import pandas as pd\npd.read_pickle(p)",
        "import yaml\nyaml.load(s)",
    ],
)
def test_the_scan_catches(code: str) -> None:
    assert violations(code), code


@pytest.mark.parametrize(
    "code",
    [
        "# torch.load would unpickle: refused\nx = 1",
        '"""adapter_model.bin is a pickle and is never loaded; eval( is never called"""',
        "model.eval()",
        "import numpy as np\nx = np.load(p)",
        "import numpy as np\nx = np.load(p, allow_pickle=False)",
        "from safetensors.torch import load_file\nt = load_file(p)",
        "import json\njson.loads(s)",
    ],
)
def test_the_scan_allows(code: str) -> None:
    assert not violations(code), code
