"""The Python packages PriorReg needs inside Slicer, installed when the user first runs something.

Nothing here runs at import: a module panel must appear in a Slicer where torch is not
installed yet, and installing is the user's choice. torch comes through the PyTorch extension
(`PyTorchUtils`, this extension's EXTENSION_DEPENDS), which picks the build that matches the
GPU driver; the other packages come from PyPI through `slicer.packaging.pip_ensure` (Slicer
5.12+, which asks and shows progress itself) or `slicer.util.pip_install`.
"""

from __future__ import annotations

import importlib
import importlib.util

# Import name -> pip requirement, for the packages the modules' code imports; the bounds are
# pyproject.toml's (Testing/packaging/test_cmake.py checks both). Slicer ships numpy, scipy and
# SimpleITK, so in practice torch and safetensors are what gets installed.
REQUIREMENTS = {
    "torch": "torch>=2.2",
    "numpy": "numpy>=1.24",
    "SimpleITK": "SimpleITK>=2.3",
    "safetensors": "safetensors>=0.4",
    "scipy": "scipy>=1.10",
    "yaml": "pyyaml>=6",  # training configs (AdversarialRegistration trains on a folder of pairs)
}


def missing_packages() -> list[str]:
    """Import names of the requirements that cannot be imported here."""
    importlib.invalidate_caches()
    return [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(
            "PriorReg needs the PyTorch extension: install 'PyTorch' in the Extensions Manager and restart Slicer"
        ) from None
    version = REQUIREMENTS["torch"][len("torch"):]
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=version) is None:
        raise RuntimeError("PyTorch was not installed; the Python console shows why")


def ensure_dependencies(confirm) -> bool:
    """Install the missing requirements; False when the user declines.

    `confirm(message) -> bool` asks the user (in Slicer, `slicer.util.confirmOkCancelDisplay`).
    Raises `RuntimeError` when something is still missing afterwards (an installation failed,
    or the user declined `pip_ensure`'s own question).
    """
    import slicer

    missing = missing_packages()
    if not missing:
        return True
    if "torch" in missing:
        if not confirm("PriorReg needs PyTorch. Install it now through the PyTorch extension? This may take several minutes."):
            return False
        _install_torch()
    others = [REQUIREMENTS[name] for name in missing if name != "torch"]
    if others:
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(others, requester="PriorReg")
        elif confirm(f"PriorReg needs these Python packages: {', '.join(others)}. Install them now?"):
            slicer.util.pip_install(others)
        else:
            return False
    still = missing_packages()
    if still:
        needed = ", ".join(REQUIREMENTS[name] for name in still)
        raise RuntimeError(f"{needed} not installed (declined, or the installation failed: the Python console shows why)")
    return True
