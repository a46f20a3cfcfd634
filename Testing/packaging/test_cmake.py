"""The extension as Slicer builds it: every file a module needs is listed in CMake, and exists.

The classic packaging bug: a module works from the source tree and fails once installed,
because a file it imports (or its .ui, or its icon) was never listed in its CMakeLists, so
Slicer did not copy it. The module's own files are listed in its CMakeLists; the `priorreg`
backend, which every module imports, once in the top-level CMakeLists (see the comment
there). Imports are walked with `ast`, inside functions too.
"""

from __future__ import annotations

import fnmatch
import shutil
import sys
from pathlib import Path

import pytest
from cmake_lists import SCRIPTED_MODULE_KEYWORDS, read_cmake, sections
from module_imports import priorreg_closure

from priorreg.slicer.dependencies import REQUIREMENTS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PROVIDED_BY_SLICER = {"slicer", "vtk", "qt", "ctk", "PyTorchUtils"}  # PyTorchUtils: the PyTorch extension


def module_folders(root: Path) -> list[str]:
    """Folders holding a scripted module: `<Name>/<Name>.py` beside a CMakeLists.txt."""
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file() and (p / "CMakeLists.txt").is_file()
    )


MODULES = module_folders(ROOT)


def scripted_module(cmake) -> dict[str, list[str]]:
    (call,) = cmake.calls("slicerMacroBuildScriptedModule")
    return sections(call, SCRIPTED_MODULE_KEYWORDS)


def backend(root: Path) -> dict[str, list[str]]:
    """SCRIPTS and RESOURCES of the top-level CMakeLists' backend (the call named PriorRegBackend)."""
    top = read_cmake(root / "CMakeLists.txt")
    calls = [sections(c, SCRIPTED_MODULE_KEYWORDS) for c in top.calls("slicerMacroBuildScriptedModule")]
    (found,) = [c for c in calls if c["NAME"] == ["PriorRegBackend"]]
    found["RESOURCE_PATTERNS"] = top.variables.get("PRIORREG_MODEL_FILES__patterns", [])
    return found


def unlisted_backend_files(root: Path, module: str) -> list[str]:
    """The `priorreg` files the module imports (transitively) that no CMake SCRIPTS list ships."""
    needed, _ = priorreg_closure(root / module / f"{module}.py", root)
    listed = set(backend(root)["SCRIPTS"])
    return sorted(str(p.relative_to(root)) for p in needed if str(p.relative_to(root)) not in listed)


def test_there_are_modules_and_the_top_level_adds_each_one():
    assert {"AdversarialRegistration", "DeepImagePriorReg"} <= set(MODULES)
    top = read_cmake(ROOT / "CMakeLists.txt")
    assert sorted(args[0] for args in top.calls("add_subdirectory")) == MODULES
    assert top.variables["EXTENSION_DEPENDS"] == ["PyTorch"]


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_its_script_ui_and_icon_and_tests(module):
    folder = ROOT / module
    cmake = read_cmake(folder / "CMakeLists.txt")
    build = scripted_module(cmake)
    assert build["NAME"] == [module]
    assert f"{module}.py" in build["SCRIPTS"]
    assert "WITH_GENERIC_TESTS" in build
    assert ["SCRIPT", f"{module}.py"] in cmake.calls("slicer_add_python_unittest")

    listed = build["SCRIPTS"] + build.get("RESOURCES", [])
    missing_on_disk = [f for f in listed if not (folder / f).is_file()]
    assert missing_on_disk == [], f"{module}/CMakeLists.txt lists files that do not exist"

    resources = sorted(str(p.relative_to(folder)) for p in (folder / "Resources").rglob("*") if p.is_file())
    assert f"Resources/UI/{module}.ui" in resources and f"Resources/Icons/{module}.png" in resources
    unlisted = [r for r in resources if r not in build.get("RESOURCES", [])]
    assert unlisted == [], f"{module}/CMakeLists.txt RESOURCES misses files in {module}/Resources"
    extra_scripts = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py") if str(p.relative_to(folder)) not in build["SCRIPTS"])
    assert extra_scripts == [], f"{module}/CMakeLists.txt SCRIPTS misses Python files of the module folder"


@pytest.mark.parametrize("module", MODULES)
def test_every_backend_file_a_module_imports_is_shipped(module):
    assert unlisted_backend_files(ROOT, module) == [], "add these to PRIORREG_BACKEND_SCRIPTS in CMakeLists.txt"


def test_backend_list_is_exactly_what_the_modules_import_and_exists():
    build = backend(ROOT)
    needed = set()
    for module in MODULES:
        files, _ = priorreg_closure(ROOT / module / f"{module}.py", ROOT)
        needed |= {str(p.relative_to(ROOT)) for p in files}
    assert [f for f in build["SCRIPTS"] if not (ROOT / f).is_file()] == []
    assert len(set(build["SCRIPTS"])) == len(build["SCRIPTS"]), "a file is listed twice"
    assert sorted(set(build["SCRIPTS"]) - needed) == [], "listed, but no module imports it: remove it"
    assert {"priorreg/slicer/logic.py", "priorreg/methods/adversarial.py", "priorreg/methods/dip.py"} <= needed


def test_shipped_models_are_resources_where_priorreg_models_finds_them():
    from priorreg import models

    build = backend(ROOT)
    patterns = build["RESOURCE_PATTERNS"]
    for name in ("Resources/Models/adversarial_mrus.safetensors", "Resources/Models/adversarial_mrus.json"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} would not be shipped"
    assert models.SHIPPED == ROOT / "Resources" / "Models"  # the same path relative to priorreg/ once installed
    on_disk = sorted(str(p.relative_to(ROOT)) for p in models.SHIPPED.glob("*") if p.suffix in (".safetensors", ".json"))
    assert sorted(build.get("RESOURCES", [])) == on_disk


def test_a_forgotten_backend_file_is_caught(tmp_path):
    """The check above fails when a module starts importing a priorreg file nobody listed."""
    module = "DeepImagePriorReg"
    shutil.copytree(ROOT / "priorreg", tmp_path / "priorreg", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / module).mkdir()
    shutil.copy(ROOT / "CMakeLists.txt", tmp_path / "CMakeLists.txt")
    (tmp_path / "priorreg" / "slicer" / "extra.py").write_text('"""A new helper."""\n')
    source = (ROOT / module / f"{module}.py").read_text()
    (tmp_path / module / f"{module}.py").write_text(source + "\n\ndef later():\n    from priorreg.slicer import extra\n")
    assert unlisted_backend_files(tmp_path, module) == ["priorreg/slicer/extra.py"]


def third_party_imports(module: str) -> set[str]:
    _, imported = priorreg_closure(ROOT / module / f"{module}.py", ROOT)
    return {name for name in imported if name not in sys.stdlib_module_names} - PROVIDED_BY_SLICER


def test_installer_knows_every_package_the_modules_import():
    """One installer serves every module: it must know each package any module needs, and nothing more."""
    assert set().union(*map(third_party_imports, MODULES)) == set(REQUIREMENTS), "priorreg/slicer/dependencies.py REQUIREMENTS is out of step"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(REQUIREMENTS.values()) <= set(pyproject), "version bounds differ from pyproject.toml"


@pytest.mark.parametrize("module", MODULES)
def test_module_panel_loads_without_torch(module):
    """What importing the module file runs (its imports outside functions) never reaches torch."""
    _, imported = priorreg_closure(ROOT / module / f"{module}.py", ROOT, eager=True)
    assert not {"torch", "safetensors", "scipy"} & imported
