"""Package metadata: one version, and every declared test extra installed (CI fails instead of skipping tests)."""
import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

import clipmoe

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version():
    """pyproject reads the version from clipmoe.__version__, which is the literal in clipmoe/__init__.py."""
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "clipmoe.__version__"}
    # setuptools reads the attribute statically, so it must be a plain string assignment in the package's __init__.
    tree = ast.parse((ROOT / "clipmoe" / "__init__.py").read_text())
    literals = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["__version__"]]
    assert literals == [clipmoe.__version__]
    assert re.fullmatch(r"\d+\.\d+\.\d+", clipmoe.__version__)


@pytest.mark.parametrize("requirement", _pyproject()["project"]["optional-dependencies"]["test"])
def test_declared_test_extra_is_installed(requirement):
    """Tests of optional integrations (transformers, scikit-learn) would otherwise skip silently."""
    name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is a declared test extra (pyproject.toml) but is not installed: "
                    f"pip install -e '.[test]'")
