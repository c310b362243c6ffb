"""What the CLI lists before anything heavy is imported: the registered architectures and the shipped recipes.

The registry (training/models/_registry.py) stays the one definition of the architectures: a builder is an
architecture because it carries `@register_model`. Importing the registry imports torch and every model family
(seconds), so the names are read here from the same source text instead: the functions decorated with
`register_model` in training/models/*.py (tests/test_training.py checks that both agree). Standard library only.
"""

from __future__ import annotations

import ast
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DECORATOR = "register_model"


def _decorated(node: ast.AST) -> bool:
    if not isinstance(node, ast.FunctionDef):
        return False
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if (isinstance(target, ast.Name) and target.id == DECORATOR) or \
                (isinstance(target, ast.Attribute) and target.attr == DECORATOR):
            return True
    return False


def architectures(models_dir: Path = MODELS_DIR) -> list[str]:
    """Names of the @register_model builders in the model files, sorted (as list_models() returns them)."""
    names = []
    for path in sorted(models_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names += [node.name for node in ast.walk(tree) if _decorated(node)]
    return sorted(names)


def recipes(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in recipes_dir.glob("*.yaml"))
