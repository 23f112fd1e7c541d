"""One registry each for rules and engines, built from the files: a rule is a pair of modules
with the same name under edgeprop/rules/ and exporters/rules/, an engine is a module under
runtimes/ that declares its formats and memory model."""
import ast
import importlib
import pkgutil

from conftest import ROOT
from edgeprop import rules
from edgeprop.memory import EngineMemory
from edgeprop.rules.base import Rule
from edgeprop.runtimes import engine_names, get_engine, memory_model


def _modules(folder):
    return {m.name for m in pkgutil.iter_modules([str(folder)])}


def test_every_rule_has_both_halves():
    device = _modules(ROOT / "edgeprop" / "rules") - set(rules.SHARED)
    desktop = _modules(ROOT / "exporters" / "rules")
    assert device == desktop, f"device half only: {device - desktop}; desktop half only: {desktop - device}"
    assert set(rules.rule_modules()) == device


def test_every_rule_name_comes_from_its_device_half():
    for module in rules.rule_modules():
        declared = importlib.import_module(f"edgeprop.rules.{module}").RULES
        assert declared, module
        for name, cls in declared.items():
            assert issubclass(cls, Rule) and isinstance(cls.updates_itself, bool), name
            assert rules.RULES[name] == (module, cls)
            assert rules.rule_module(name) == module


def test_every_engine_declares_its_formats_and_memory_model():
    assert {"onnxruntime", "litert", "tflm", "ort-training", "c99"} <= set(engine_names())
    for name in engine_names():
        module = importlib.import_module(f"edgeprop.runtimes.{name.replace('-', '_')}")  # no engine package needed
        assert module.FORMATS and all(f in (".onnx", ".tflite") for f in module.FORMATS), name
        assert isinstance(module.MEMORY, EngineMemory) and module.MEMORY.name == name
        assert memory_model(name) is module.MEMORY
        engine = getattr(module, "Engine", None)
        if engine is not None:  # runs graphs here (c99 runs on the microcontroller)
            assert engine.name == name and engine.suffix in module.FORMATS, name
            assert isinstance(engine.trains_itself, bool), name
    assert get_engine("onnxruntime").trains_itself is False


def test_whether_an_engine_trains_by_itself_is_read_in_one_place():
    readers = set()
    for folder in ("edgeprop", "exporters", "runtimes", "targets", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            if any(isinstance(n, ast.Attribute) and n.attr == "trains_itself" and isinstance(n.ctx, ast.Load)
                   for n in ast.walk(tree)):
                readers.add(str(path.relative_to(ROOT)))
    assert readers == {"edgeprop/trainer.py"}
