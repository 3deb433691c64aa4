"""The repository layout keeps `platform/` a source root that never shadows the standard library."""

import subprocess
import sys

from conftest import REPO


def test_platform_is_not_a_package():
    assert (REPO / "platform" / "ember" / "__init__.py").is_file()
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_platform_gives_the_standard_library_from_the_repo_root():
    code = "import platform, ember; print(platform.__file__); print(platform.python_version()); print(ember.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    platform_file, version, ember_file = out.split("\n")[:3]
    assert platform_file.endswith("platform.py") and str(REPO) not in platform_file
    assert version.count(".") == 2
    assert ember_file.startswith(str(REPO / "platform" / "ember"))


def test_project_folders_exist():
    for folder in ("platform/ember", "jobs", "serve", "cluster", "benchmarks", "tests"):
        assert (REPO / folder).is_dir(), folder
    for name in ("pyproject.toml", "Makefile", "README.md", ".ci/run"):
        assert (REPO / name).is_file(), name
    assert "make test" in (REPO / ".ci" / "run").read_text()
