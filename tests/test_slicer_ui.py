"""The .ui file against the Widget: every `self.ui.<name>` exists with the class the Widget expects, parameter
bindings name real parameters with a supported widget, and the shortcut keys are written on the buttons."""
import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "Resources" / "UI" / "LesionLocator.ui"
MODULE_SOURCE = (REPO / "LesionLocator" / "LesionLocator.py").read_text()
LOGIC_SOURCE = (REPO / "LesionLocator" / "LesionLocatorSlicer" / "logic.py").read_text()

# The class each widget the Widget uses must have (what its code calls on it needs that class).
EXPECTED_CLASSES = {
    "addTimepointSelector": "qMRMLNodeComboBox",
    "addTimepointButton": "QPushButton",
    "removeTimepointButton": "QPushButton",
    "timepointsListWidget": "QListWidget",
    "timepointOrderLabel": "QLabel",
    "pointButton": "QPushButton",
    "boxButton": "QPushButton",
    "newLesionButton": "QPushButton",
    "trackButton": "QPushButton",
    "undoButton": "QPushButton",
    "deleteButton": "QPushButton",
    "cancelButton": "QPushButton",
    "lesionTableWidget": "QTableWidget",
    "lymphNodeButton": "QPushButton",
    "confirmAbsentButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "measureButton": "QPushButton",
    "exportReportButton": "QPushButton",
    "saveSegmentationsButton": "QPushButton",
    "modelFolderPathLineEdit": "ctkPathLineEdit",
    "cpuWarningLabel": "QLabel",
    "intensityWarningLabel": "QLabel",
}
# Widgets that the parameter node wrapper can bind to each parameter type (Slicer's GUI connectors).
CONNECTORS = {"str": {"QComboBox", "ctkComboBox", "QLineEdit"}, "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
              "ModelChoice": {"QComboBox", "ctkComboBox"}, "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
              "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"}}


@pytest.fixture(scope="module")
def widgets() -> dict[str, ElementTree.Element]:
    return {element.get("name"): element for element in ElementTree.parse(UI_FILE).iter("widget")}


def parameterTypes() -> dict[str, str]:
    """name -> type of the fields of LesionLocatorParameterNode (Annotated[str, ...] -> str)."""
    tree = ast.parse(MODULE_SOURCE)
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "LesionLocatorParameterNode")
    types = {}
    for statement in wrapper.body:
        if isinstance(statement, ast.AnnAssign):
            annotation = statement.annotation
            if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
                annotation = annotation.slice.elts[0]
            types[statement.target.id] = ast.unparse(annotation)
    return types


def test_every_widget_the_code_uses_exists_with_the_expected_class(widgets):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SOURCE))
    assert used - set(EXPECTED_CLASSES) == set(), "new widget in the code: add its expected class to this test"
    for name in sorted(used):
        assert name in widgets, f"self.ui.{name} is not in {UI_FILE.name}"
        assert widgets[name].get("class") == EXPECTED_CLASSES[name], name


def test_parameter_bindings_name_real_parameters_with_a_supported_widget(widgets):
    types = parameterTypes()
    bound = {}
    for name, element in widgets.items():
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = element.get("class")
    assert set(bound) == {"model", "modelFolder", "device", "preset", "registration", "cpuBfloat16",
                          "pointSearch", "boxRefinement"}
    for parameter, widgetClass in bound.items():
        assert parameter in types, f"no parameter '{parameter}' in LesionLocatorParameterNode"
        assert widgetClass in CONNECTORS[types[parameter]], f"{widgetClass} cannot show a {types[parameter]}"


def test_prompt_and_reader_statement_buttons_are_checkable(widgets):
    for name in ("pointButton", "boxButton", "lymphNodeButton", "confirmAbsentButton"):
        checkable = [p for p in widgets[name].findall("property") if p.get("name") == "checkable"]
        assert checkable and checkable[0].find("bool").text == "true", name


def test_shortcut_keys_are_shown_on_the_buttons_they_press(widgets):
    bindings = re.search(r"bindings = \((.*?)\)\n", MODULE_SOURCE, re.S).group(1)
    handlers = dict(re.findall(r'\("([^"]+)", self\.(?:ui\.)?(\w+)', bindings))
    buttonFor = {"pointButton": "pointButton", "boxButton": "boxButton", "onTrack": "trackButton",
                 "onUndo": "undoButton", "onDeleteLesion": "deleteButton", "onNewLesion": "newLesionButton"}
    assert set(handlers) == {"P", "B", "T", "Ctrl+Z", "Del", "N"}
    for keys, handler in handlers.items():
        text = widgets[buttonFor[handler]].find("property[@name='text']/string").text
        assert text.endswith(f"({keys})"), f"{buttonFor[handler]} says '{text}', its key is {keys}"


def test_node_selector_gets_the_scene_from_the_module_widget():
    connections = ElementTree.parse(UI_FILE).find("connections")
    receivers = {c.findtext("receiver") for c in connections if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert receivers == {"addTimepointSelector"}


def test_reader_statement_buttons_act_on_clicks_and_say_what_they_do_for_recist(widgets):
    """The Widget sets their checked state from the lesion table: only a click (not 'toggled') may call the Logic."""
    for name, handler, logicCall in (("lymphNodeButton", "onLymphNodeClicked", "setLymphNode"),
                                     ("confirmAbsentButton", "onConfirmAbsentClicked", "setConfirmedAbsent")):
        assert f'self.ui.{name}.connect("clicked(bool)", self.{handler})' in MODULE_SOURCE
        body = re.search(rf"def {handler}\(.*?\n\n", MODULE_SOURCE, re.S).group(0)
        assert f"self.logic.{logicCall}(" in body
        assert "RECIST" in widgets[name].find("property[@name='toolTip']/string").text


def test_every_logic_member_the_widget_uses_exists():
    classes = [node for source in (MODULE_SOURCE, LOGIC_SOURCE) for node in ast.parse(source).body
               if isinstance(node, ast.ClassDef) and node.name in ("LesionTrackingLogic", "LesionLocatorLogic")]
    members = {node.name for cls in classes for node in cls.body if isinstance(node, ast.FunctionDef)}
    members |= {target.attr for cls in classes for node in ast.walk(cls) if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Attribute)}
    widget = slice(MODULE_SOURCE.index("class LesionLocatorWidget"), MODULE_SOURCE.index("class LesionLocatorLogic"))
    widgetSource = MODULE_SOURCE[widget]
    used = set(re.findall(r"self\.logic\.(\w+)", widgetSource))
    assert used <= members, f"the Logic has no {sorted(used - members)}"
