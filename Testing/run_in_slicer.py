"""Run each module's self-test (<Module>Test in <Module>/<Module>.py) inside a real Slicer.

From the repository root:

    Slicer --no-main-window --python-script Testing/run_in_slicer.py

With `--additional-module-paths AdversarialRegistration DeepImagePriorReg RegQualityScore` before
`--python-script`, Slicer also loads the modules, and each module's panel is built too (its
.ui loaded and bound to its parameter node). The tests read the shared data (`../shared/data`,
or $PRIORREG_DATA) and need torch in Slicer's Python (the PyTorch extension, or
`PythonSlicer -m pip install torch`); RegQualityScore's also the shipped AIR-net model
(Resources/Models/airnet_mrus). Exits with status 1 when a test fails, 0 otherwise; a test
that cannot run (no data) is reported as skipped.

This is the real-Slicer tier: the same flows as Testing/mrml/test_modules.py and
test_quality_module.py, on Slicer's application scene instead of a bare slicer-core scene.
"""

import importlib
import sys
import traceback
import unittest
from pathlib import Path

import slicer

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.name for p in ROOT.iterdir() if (p / f"{p.name}.py").is_file() and (p / "CMakeLists.txt").is_file())


def run() -> int:
    for path in [ROOT] + [ROOT / name for name in MODULES]:  # priorreg, then each module file
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    failed, skipped = [], []
    for name in MODULES:
        try:
            if hasattr(slicer.modules, name.lower()):  # loaded by Slicer (--additional-module-paths)
                slicer.util.getModuleWidget(name)
                print(f"{name}: panel built")
            module = importlib.import_module(name)
            getattr(module, f"{name}Test")().runTest()
            print(f"{name}: passed")
        except unittest.SkipTest as reason:
            print(f"{name}: SKIPPED: {reason}")
            skipped.append(name)
        except Exception:
            traceback.print_exc()
            print(f"{name}: FAILED")
            failed.append(name)
    passed = len(MODULES) - len(failed) - len(skipped)
    print(f"{passed} passed, {len(failed)} failed, {len(skipped)} skipped" + (f" (failed: {', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


slicer.util.exit(run())
