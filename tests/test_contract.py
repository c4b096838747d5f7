"""The contract between build and run (illume_rt/contract.py, docs/bundle-format.md): one description, read by
every stage, carried by the manifest, followed by a host that does not import illume-rt, and checked on load.
The bundle-free tests (the grammar, host_contract, component_io, a host's reading of the contract alone) are in
tests/test_contract_rules.py."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from illume_rt.contract import decode_plan, image_grid, image_slots
from illume_rt.runtime.bundle import BundleError, load_bundle
from illume_rt.runtime.prompts import text_to_image_ids
from illume_rt.runtime.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("resolution", ["256x256", "384x512", "320x960"])
def test_a_host_rebuilds_the_schedule_and_prompts_from_the_manifest_alone(tiny_bundle, resolution):
    prompt = "a {red} circle, \u00e9t\u00e9"  # braces and non-ASCII go through as text
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "host_reader.py"), str(tiny_bundle), resolution,
                          prompt], capture_output=True, text=True, check=True)
    host = json.loads(out.stdout)
    assert host["imported_illume_rt"] is False
    bundle = load_bundle(tiny_bundle, verify=False)
    vocab = bundle.vocab
    grid = image_grid(*(int(x) for x in resolution.split("x")))
    want = [vocab.token_id(s.token) if s.level is None else {"level": s.level} for s in image_slots(grid)]
    assert host["positions"] == want
    plan = decode_plan(grid)
    assert host["plan"] == {"prefix": [vocab.token_id(t) for t in plan.prefix],
                            "steps": [{"forced": [vocab.token_id(t) for t in s.forced], "level": s.level}
                                      for s in plan.steps]}
    cond, uncond = text_to_image_ids(ByteTokenizer(vocab), vocab, prompt, grid.height, grid.width)
    assert (host["cond"], host["uncond"]) == (cond, uncond)


def _copy_manifest_only(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx", "*.npy", "*.data"))
    return dst


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_format_3_is_refused_with_the_reexport_command(tiny_bundle, tmp_path):
    old = _copy_manifest_only(tiny_bundle, tmp_path / "old")
    _edit_manifest(old, lambda m: m.update(format_version=3))
    with pytest.raises(BundleError, match=r"format 3 .*reads format 4.*`illume-rt export --preset tiny -o NEW_BUNDLE`"):
        load_bundle(old, verify=False)


def test_a_bundle_made_for_another_contract_is_refused(tiny_bundle, tmp_path):
    other = _copy_manifest_only(tiny_bundle, tmp_path / "other")
    _edit_manifest(other, lambda m: m["contract"]["prompts"].update(system="You are a pirate."))
    with pytest.raises(BundleError, match="contract.prompts differs.*re-export"):
        load_bundle(other, verify=False)
    renamed = _copy_manifest_only(tiny_bundle, tmp_path / "renamed")
    _edit_manifest(renamed, lambda m: m["components"]["pixel_decoder"]["outputs"][0].update(name="pixels"))
    with pytest.raises(BundleError, match=r"pixel_decoder.*\['pixels'\].*expects"):
        load_bundle(renamed, verify=False)


# -- imports point one way ------------------------------------------------------------------------------------------

PACKAGES = {"illume_rt.runtime": "runtime", "illume_rt.engines": "engines", "illume_rt.export": "export",
            "illume_rt.calibration": "calibration", "illume_rt.bench": "bench", "illume_rt.nano": "nano"}
# what each layer may import (besides itself); the base (contract, errors, files) imports only the base
ALLOWED = {
    "base": {"base"},
    "engines": {"base"},
    "runtime": {"base", "engines"},
    "export": {"base"},
    "cli": {"base", "runtime", "engines", "export", "calibration", "bench", "nano", "top"},
    # the built-in model's grammar gives a nano bundle its calibration prompts and its prompt scorer (nano imports
    # neither calibration nor the CLI: its scripts that do are tools)
    "calibration": {"base", "runtime", "engines", "export", "nano"},
    "bench": {"base", "runtime", "engines", "export", "calibration", "nano"},
    "nano": {"base", "runtime", "engines", "export"},  # illume-nano's definition and checkpoint
    "tools": {"base", "runtime", "engines", "export", "calibration", "bench", "nano", "cli", "top"},
    "top": {"base", "runtime", "engines"},
}
TOOLS = ("illume_rt.nano.train", "illume_rt.nano.evaluate", "illume_rt.nano.diagnose", "illume_rt.nano.gallery",  # scripts
         "illume_rt.nano.quantized_eval", "illume_rt.nano.choose_sampling",
         "illume_rt.bench.device_check", "illume_rt.bench.ort_cuda_check")


def _layer(module: str) -> str:
    if module in TOOLS:
        return "tools"
    for prefix, layer in PACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    if module in ("illume_rt.contract", "illume_rt.errors", "illume_rt.files"):
        return "base"
    if module == "illume_rt.cli":
        return "cli"
    return "top"  # illume_rt itself (__version__, the lazy public names)


def _source_modules():
    folders = {"runtime": "illume_rt.runtime", "engines": "illume_rt.engines", "export": "illume_rt.export",
               "calibration": "illume_rt.calibration", "bench": "illume_rt.bench", "nano": "illume_rt.nano"}
    for folder, package in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            yield path, ".".join([package, *rel.parts]).removesuffix(".__init__")
    for path in (ROOT / "illume_rt").glob("*.py"):
        yield path, "illume_rt" if path.stem == "__init__" else f"illume_rt.{path.stem}"


def test_imports_point_one_way():
    """cli -> runtime -> engines -> contract, export -> contract: every import in the source, lazy ones too
    (type-checking-only imports excepted)."""
    wrong = []
    for path, module in _source_modules():
        tree = ast.parse(path.read_text())
        checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                    and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in checking or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.startswith("illume_rt"):
                    if isinstance(node, ast.ImportFrom) and name == "illume_rt":
                        # illume_rt.__version__ is a constant: importing it loads nothing else (lazy names)
                        targets = [f"illume_rt.{a.name}" if a.name in ("contract", "errors", "files")
                                   else "illume_rt.contract" if a.name == "__version__" else "illume_rt"
                                   for a in node.names]
                    else:
                        targets = [name]
                    for target in targets:
                        if _layer(target) not in ALLOWED[_layer(module)] | {_layer(module)}:
                            wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {module} -> {target}")
    assert not wrong, "\n".join(wrong)
