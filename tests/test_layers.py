"""Floors that only go down (pipeline/__init__.py): ground < data < model < training < evaluation
< CLI. Every module's imports, function-level ones included, parsed with ast: none reaches a
higher floor, and only the codec seam (pipeline/model/codecs/) imports a codec library."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["ground", "data", "model", "training", "evaluation", "cli"]
GROUND = {"geometry", "gpus", "settings", "locks", "ui"}
CLI = {"__main__", "bench", "gpucheck", "configdiff"}
CODEC_LIBRARIES = {"snac", "transformers"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in CLI:        # the package itself: `pipeline.load`
        return "cli"
    if parts[1] in ("data", "model", "training", "evaluation"):
        return parts[1]
    if parts[1] in GROUND:
        return "ground"
    raise AssertionError(f"{module}: no floor assigned (add it here and to pipeline/__init__.py's layout)")


def imports(path: Path, root: Path) -> list:
    """(line, absolute module name) of every import in the file, at any depth (`from . import x`:
    the module x)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                out.append((node.lineno, target))
            else:                               # `from .. import training`: the names are the modules
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def upward(root: Path) -> tuple[list, int]:
    """(imports that reach a higher floor, how many package imports were looked at)."""
    bad, seen = [], 0
    for path in sorted((root / "pipeline").rglob("*.py")):
        here = floor(module_name(path, root))
        for line, name in imports(path, root):
            if name.split(".")[0] == "pipeline":
                seen += 1
                if FLOORS.index(floor(name)) > FLOORS.index(here):
                    bad.append(f"{path.relative_to(root)}:{line} ({here}) imports {name} ({floor(name)})")
    return bad, seen


def test_every_module_has_a_floor_and_imports_none_above_it():
    bad, seen = upward(ROOT)
    assert seen > 100 and not bad, "\n".join(bad)


def test_only_the_codec_seam_imports_a_codec_library():
    outside = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in sorted((ROOT / "pipeline").rglob("*.py"))
               if "pipeline/model/codecs/" not in path.as_posix()
               for line, name in imports(path, ROOT) if name.split(".")[0] in CODEC_LIBRARIES]
    assert not outside, "\n".join(outside)


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    """The check can fail: a data module importing the trainer inside a function, relatively."""
    (tmp_path / "pipeline" / "data").mkdir(parents=True)
    (tmp_path / "pipeline" / "data" / "x.py").write_text(
        "from . import cache\n\ndef f():\n    from .. import training\n    from ..model.codecs import snac\n")
    bad, seen = upward(tmp_path)
    assert seen == 3 and [b.split(" imports ")[1] for b in bad] == [
        "pipeline.training (training)", "pipeline.model.codecs (model)"]


def test_a_snac_model_loads_without_importing_transformers(tmp_path):
    """Loading a SNAC 48 kHz model (pipeline.load, resynth, decode, evaluate, every phase after the
    first) imports its own family alone: transformers, Mimi's library, takes seconds to import."""
    import subprocess
    import sys

    from conftest import tiny_codec

    from pipeline.model import codecs
    codecs.save_model(codecs.from_codec(tiny_codec(), 48000), tmp_path / "m")
    code = ("import sys; from pipeline.model import codecs; codecs.load_model(sys.argv[1]); "
            "print(sorted(m for m in ('snac', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "['snac']", out.stdout
