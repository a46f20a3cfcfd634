"""Module panels: each .ui is well formed and holds every widget its module's code names.

Slicer loads a module's .ui with `slicer.util.loadUI` and reaches widgets as `self.ui.<name>`;
a renamed or missing widget only fails when a user opens the module. The parameter node
binds widgets by their `SlicerParameterName` property, and a widget whose class cannot hold
the parameter's type fails in `connectGui`, again only in front of a user. Both are checked
here from the files, without Slicer.

Where PySide6 is installed, each panel is also loaded with Qt's own `QUiLoader`, offscreen,
with Slicer's widgets stood in for by the Qt widgets they look like, and kept as a PNG.
"""

from __future__ import annotations

import ast
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PANEL = ROOT / "priorreg" / "slicer" / "panel.py"  # the widgets' shared code
MODULES = sorted(p.name for p in ROOT.iterdir() if (p / f"{p.name}.py").is_file() and (p / "CMakeLists.txt").is_file())

# Naming convention: the suffix says what a widget is.
SUFFIX_CLASSES = {
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "Selector": {"qMRMLNodeComboBox"},
    "ComboBox": {"QComboBox"},
    "SpinBox": {"QSpinBox", "QDoubleSpinBox"},
    "Slider": {"ctkSliderWidget", "QSlider"},
    "Button": {"QPushButton", "QToolButton"},
    "Label": {"QLabel"},
    "LineEdit": {"QLineEdit"},
    "PathLineEdit": {"ctkPathLineEdit"},
    "ProgressBar": {"QProgressBar"},
    "TableView": {"qMRMLTableView"},
}
# What `slicer.parameterNodeWrapper`'s GUI connectors accept for a parameter type.
TYPE_CLASSES = {
    "str": {"QComboBox", "QLineEdit"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "bool": {"QCheckBox"},
}


def ui_tree(module: str) -> ET.ElementTree:
    return ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")


def widgets(tree) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in tree.iter("widget")}


def prop(widget: ET.Element, name: str):
    for p in widget.findall("property"):
        if p.get("name") == name:
            return p
    return None


def module_source(module: str) -> ast.Module:
    return ast.parse((ROOT / module / f"{module}.py").read_text())


def ui_names(tree: ast.AST) -> set[str]:
    """Every `self.ui.<name>` in the code under `tree`."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }


def widget_class(module: str) -> ast.ClassDef:
    (widget,) = [n for n in module_source(module).body if isinstance(n, ast.ClassDef) and n.name == f"{module}Widget"]
    return widget


def mixins(module: str) -> list[ast.ClassDef]:
    """The classes of `priorreg/slicer/panel.py` the module's widget derives from (their code names widgets too)."""
    shared = {n.name: n for n in ast.parse(PANEL.read_text()).body if isinstance(n, ast.ClassDef)}
    return [shared[b.id] for b in widget_class(module).bases if isinstance(b, ast.Name) and b.id in shared]


def code_ui_names(module: str) -> set[str]:
    """Every `self.ui.<name>` in the module's code and in the shared panel code its widget uses."""
    return ui_names(module_source(module)).union(*(ui_names(cls) for cls in mixins(module)))


def parameters(tree: ast.Module) -> dict[str, tuple[str, dict[str, list]]]:
    """The `@parameterNodeWrapper` class's fields: name -> (type name, {validator name: its arguments})."""
    (cls,) = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in n.decorator_list)
    ]
    out = {}
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        annotation, validators = stmt.annotation, {}
        if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
            first, *rest = annotation.slice.elts
            annotation = first
            validators = {v.func.id: [ast.literal_eval(a) for a in v.args] for v in rest if isinstance(v, ast.Call)}
        out[stmt.target.id] = (annotation.id, validators)
    return out


def expected_classes(name: str) -> set[str]:
    for suffix in sorted(SUFFIX_CLASSES, key=len, reverse=True):
        if name.lower().endswith(suffix.lower()):
            return SUFFIX_CLASSES[suffix]
    raise AssertionError(f"widget name {name!r} has none of the suffixes {sorted(SUFFIX_CLASSES)}")


@pytest.mark.parametrize("module", MODULES)
def test_ui_is_well_formed_and_loaded_by_the_module(module):
    tree = ui_tree(module)
    root = tree.getroot().find("widget")
    assert (root.get("class"), root.get("name")) == ("qMRMLWidget", module)
    assert f'"UI/{module}.ui"' in (ROOT / module / f"{module}.py").read_text()
    names = [w.get("name") for w in tree.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_code_names_exists_with_a_plausible_class(module):
    found = widgets(ui_tree(module))
    named = code_ui_names(module)
    assert {"applyButton", "cancelButton", "progressBar", "statusLabel", "opacitySlider"} <= named
    missing = sorted(named - set(found))
    assert missing == [], f"{module}.py or the panel code it uses names self.ui.{missing} but {module}.ui has no such widget"
    for name in named:
        assert found[name].get("class") in expected_classes(name), f"{name} is a {found[name].get('class')}"


@pytest.mark.parametrize("module", MODULES)
def test_widget_uses_the_shared_panel_code_as_it_asks(module):
    """Before Slicer's widget class in the bases (its enter, exit and cleanup are the ones that run), and every
    hook the shared code leaves to the module (a method raising NotImplementedError) defined by the widget."""
    widget = widget_class(module)
    bases = [b.id for b in widget.bases if isinstance(b, ast.Name)]
    used = mixins(module)
    assert "JobPanel" in bases, f"{module}Widget does not use priorreg.slicer.panel.JobPanel"
    assert bases.index("ScriptedLoadableModuleWidget") == len(used), f"{module}Widget: the shared classes come first: {bases}"
    defined = {f.name for f in widget.body if isinstance(f, ast.FunctionDef)}
    hooks = {
        f.name
        for cls in used
        for f in cls.body
        if isinstance(f, ast.FunctionDef) and any(isinstance(n, ast.Raise) and "NotImplementedError" in ast.unparse(n) for n in ast.walk(f))
    }
    assert hooks and sorted(hooks - defined) == [], f"{module}Widget leaves {sorted(hooks - defined)} undefined"
    assert "onApplyButton" in defined


@pytest.mark.parametrize("module", MODULES)
def test_parameter_bindings_fit_the_parameter_types(module):
    tree = ui_tree(module)
    panel = PANEL.read_text()
    source = (ROOT / module / f"{module}.py").read_text() + "".join(ast.get_source_segment(panel, c) for c in mixins(module))
    fields = parameters(module_source(module))
    bound = {}
    for widget in tree.iter("widget"):
        p = prop(widget, "SlicerParameterName")
        if p is not None:
            bound[p.find("string").text] = widget
    assert sorted(set(bound) - set(fields)) == [], "widgets bound to parameters the parameter node does not have"
    for name, (type_name, validators) in fields.items():
        if name not in bound:
            assert f"self._parameterNode.{name} =" in source, f"parameter {name} has no widget and is never set"
            continue
        widget = bound[name]
        cls = widget.get("class")
        if type_name.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", f"{name}: a node needs a qMRMLNodeComboBox"
            node_types = [s.text for s in prop(widget, "nodeTypes").iter("string")]
            assert node_types == [type_name], f"{name}: combo box lists {node_types}"
            continue
        assert cls in TYPE_CLASSES[type_name], f"{name} ({type_name}) bound to a {cls}"
        if cls == "QComboBox":
            assert "Choice" in validators, f"{name}: a combo box binding needs a Choice annotation"
        if cls in ("ctkSliderWidget", "QSlider"):
            assert "WithinRange" in validators, f"{name}: a slider binding needs WithinRange"


@pytest.mark.parametrize("module", MODULES)
def test_custom_widgets_are_declared_and_node_selectors_see_the_scene(module):
    tree = ui_tree(module)
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    used = {w.get("class") for w in tree.iter("widget")}
    assert sorted(c for c in used if c[0] in "cq" and c not in declared) == []
    selectors = {w.get("name") for w in tree.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver")
        for c in tree.iter("connection")
        if c.findtext("sender") == module
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors and selectors == connected, "a node selector without the scene lists nothing"


# ----------------------------------------------------------------------------- Qt rendering
def qt_only(tree: ET.ElementTree) -> bytes:
    """The .ui with Slicer's widgets replaced by the Qt widgets they look like, for QUiLoader."""
    root = tree.getroot()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        drop = set()
        if cls == "qMRMLWidget":
            widget.set("class", "QWidget")
        elif cls == "ctkCollapsibleButton":  # a titled box (the test hides a collapsed one's content)
            widget.set("class", "QGroupBox")
            prop(widget, "text").set("name", "title")
            drop = {"collapsed"}
        elif cls == "qMRMLNodeComboBox":
            widget.set("class", "QComboBox")
            drop = {"nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled"}
        elif cls == "ctkPathLineEdit":
            widget.set("class", "QLineEdit")
            drop = {"filters"}
        elif cls == "qMRMLTableView":
            widget.set("class", "QTableView")
        elif cls == "ctkSliderWidget":
            widget.set("class", "QSlider")
            drop = {"singleStep", "maximum", "value"}
            orientation = ET.SubElement(widget, "property", name="orientation")
            ET.SubElement(orientation, "enum").text = "Qt::Horizontal"
        for p in list(widget.findall("property")):
            if p.get("name") in drop:
                widget.remove(p)
    for section in ("customwidgets", "connections"):
        if root.find(section) is not None:
            root.remove(root.find(section))
    return ET.tostring(root, encoding="utf-8")


@pytest.mark.parametrize("module", MODULES)
def test_panel_loads_with_qt_and_is_kept_as_png(module, artifacts_dir):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6", reason="PySide6 not installed (pip install PySide6-Essentials) to render the panels")
    try:
        import PySide6.QtWidgets  # noqa: F401  (needs the system's libGL/libEGL/fontconfig)
    except ImportError as error:
        pytest.skip(f"PySide6 is installed but Qt cannot load here: {error}")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QWidget

    app = QApplication.instance() or QApplication([])
    loader = QUiLoader()
    data = QByteArray(qt_only(ui_tree(module)))
    buffer = QBuffer(data)
    assert buffer.open(QIODevice.ReadOnly)
    panel = loader.load(buffer)
    assert panel is not None, loader.errorString()
    missing = sorted(n for n in code_ui_names(module) if panel.findChild(QWidget, n) is None)
    assert missing == []

    # As the module shows it at rest: choices in the bound combo boxes, collapsed sections
    # collapsed, Cancel hidden until a run.
    fields = parameters(module_source(module))
    for widget in ui_tree(module).iter("widget"):
        p = prop(widget, "SlicerParameterName")
        choices = fields[p.find("string").text][1].get("Choice") if p is not None else None
        if choices:
            panel.findChild(QComboBox, widget.get("name")).addItems(choices[0])
        collapsed = prop(widget, "collapsed")
        if collapsed is not None and collapsed.findtext("bool") == "true":
            for child in panel.findChild(QWidget, widget.get("name")).findChildren(QWidget):
                child.hide()
    panel.findChild(QWidget, "cancelButton").hide()
    panel.resize(400, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    image = panel.grab().toImage()
    path = artifacts_dir / f"{module}_panel.png"
    assert image.save(str(path))
    assert image.width() == 400 and image.height() > 200
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(colours) > 5, "the panel rendered blank"
    panel.close()


def test_the_dip_panel_offers_every_similarity_the_backend_has():
    """The parameter node needs its choices as a literal (the module must load without torch): held equal to the backend's."""
    from priorreg.methods.common import SIMILARITIES

    (choices,) = parameters(module_source("DeepImagePriorReg"))["similarity"][1]["Choice"]
    assert sorted(choices) == sorted(SIMILARITIES)
