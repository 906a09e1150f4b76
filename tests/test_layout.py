"""The package's layers, as each folder's docstring states them: no module imports one from a layer
above its own (imports inside functions included)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kd_sentiment"
LAYERS = {"core": 0, "training": 1, "deploy": 2, "measure": 3, "report": 4}  # the package's own modules: 5


def layer(module: str) -> int:
    """`kd_sentiment.<folder>...` -> its folder's layer; a module of the package itself (cli, pipeline, study): 5."""
    return LAYERS.get(module.split(".")[1], 5)


def imports(path: Path) -> set[str]:
    """The kd_sentiment modules and folders `path` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "kd_sentiment":
            found |= {f"kd_sentiment.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kd_sentiment."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kd_sentiment.")}
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_one_from_a_layer_above(path):
    module = "kd_sentiment." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    above = sorted(m for m in imports(path) if layer(m) > layer(module))
    assert not above, f"{module} (layer {layer(module)}) imports {above}"


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    for folder in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and "Import" in doc, folder
