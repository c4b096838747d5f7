"""TensorRT's ONNX operator support as data: which ops the ONNX parser accepts, for which element types, and
under which restrictions.

The table lives in ``engines/data/tensorrt_ops_<version>.json``. It was generated from onnx-tensorrt's operator
document (``docs/operators.md``; repository, branch and commit recorded in the file) with
``parse_operator_doc`` below, so a newer TensorRT release is one regeneration away:

    python -m illume_rt.engines.trt_ops path/to/onnx-tensorrt/docs/operators.md 10.x <commit> > engines/data/...

Tables shipped: 10.1 (commit recorded) and 10.15 (the default: opset 9..24, BF16 throughout, the document's header
names its release; its commit was not recorded where it was read). No onnx-tensorrt operator list of a TensorRT
11 release was reachable when this was written; TensorRT 11 builds are checked against 10.15's table.

Type names follow the document (FP32, FP16, BF16, INT32, INT64, INT8, FP8, FP4, INT4, UINT8, BOOL, DOUBLE).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_VERSION = "10.15"  # the newest onnx-tensorrt operator list reachable here (no 11.x list was): docs/engines.md

# ONNX TensorProto element type -> the document's type name.
ONNX_TYPE_NAMES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE", 16: "BF16",
    17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8",  # E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ
    22: "INT4", 23: "FP4",  # FLOAT4E2M1
}
_TYPE_ALIASES = {"INF64": "INT64"}  # a typo in the 10.x document (ConstantOfShape)


@dataclass(frozen=True)
class OpSupport:
    op: str
    supported: bool
    types: tuple[str, ...]
    restrictions: str


@dataclass(frozen=True)
class OpTable:
    tensorrt_version: str
    opset_min: int
    opset_max: int
    network_types: tuple[str, ...]
    ops: dict
    source: dict
    errata: dict  # corrections read from the parser source of the same commit, with the line cited

    def get(self, op: str) -> OpSupport | None:
        return self.ops.get(op)


def parse_operator_doc(text: str) -> dict:
    """onnx-tensorrt ``docs/operators.md`` -> the JSON structure stored under ``engines/data``."""
    opset = re.search(r"range of opset (\d+) to opset (\d+)", text)
    types_line = re.search(r"supports the following ONNX data types: ([^\n]+)", text)
    ops = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("| Operator"):
            in_table = True
            continue
        if not in_table or not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name, supported = cells[0], cells[1] == "Y"
        raw_types = cells[2] if len(cells) > 2 else ""
        types = []
        for t in raw_types.split(","):
            t = _TYPE_ALIASES.get(t.strip().upper(), t.strip().upper())
            if t:
                types.append(t)
        restrictions = " ".join(c for c in cells[3:] if c).replace("<br />", " ").strip()
        ops[name] = {"supported": supported, "types": types, "restrictions": restrictions}
    network_types = []
    if types_line:
        for t in re.split(r",\s*|\s+and\s+", types_line.group(1).rstrip(".")):
            t = t.strip().upper().replace("BFLOAT16", "BF16").replace("FLOAT32", "FP32").replace("FLOAT16", "FP16")
            if t.startswith("AND "):
                t = t[4:]
            if t:
                network_types.append(t)
    return {"opset_min": int(opset.group(1)) if opset else None, "opset_max": int(opset.group(2)) if opset else None,
            "network_types": network_types, "ops": ops}


@lru_cache(maxsize=None)
def load_op_table(version: str = DEFAULT_VERSION) -> OpTable:
    path = DATA_DIR / f"tensorrt_ops_{version}.json"
    if not path.is_file():
        have = sorted(p.stem.removeprefix("tensorrt_ops_") for p in DATA_DIR.glob("tensorrt_ops_*.json"))
        raise FileNotFoundError(f"no TensorRT operator table for version {version} (have {', '.join(have)}); "
                                "generate one with `python -m illume_rt.engines.trt_ops`")
    data = json.loads(path.read_text())
    ops = {name: OpSupport(name, entry["supported"], tuple(entry["types"]), entry["restrictions"])
           for name, entry in data["ops"].items()}
    return OpTable(data["tensorrt_version"], data["opset_min"], data["opset_max"], tuple(data["network_types"]),
                   ops, data["source"],
                   data.get("errata", {}))


def available_versions() -> list[str]:
    return sorted(p.stem.removeprefix("tensorrt_ops_") for p in DATA_DIR.glob("tensorrt_ops_*.json"))


def _main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m illume_rt.engines.trt_ops OPERATORS_MD TENSORRT_VERSION COMMIT", file=sys.stderr)
        return 2
    doc, version, commit = argv
    data = {"tensorrt_version": version,
            "source": {"repository": "https://github.com/onnx/onnx-tensorrt", "path": "docs/operators.md",
                       "commit": commit},
            **parse_operator_doc(Path(doc).read_text())}
    print(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
