"""The semantic encoder's sampled check at the official width (3B/7B vision tower, random weights), lazily held."""
import json, resource, sys, time
from pathlib import Path

import torch

from illume_rt.export import components, streaming
from illume_rt.export.components import export_onnx
from illume_rt.export.configs import get_preset
from illume_rt.export.networks.vision import build_projectors, build_vision_tower, vision_tower_component

torch.set_num_threads(2)
out = Path(sys.argv[1])
preset = get_preset("3b")
t0 = time.perf_counter()
tower, projectors = build_vision_tower(preset), build_projectors(preset)


def lazy_of(module, meta):
    fake = streaming.fake_empty(meta)
    real = module.state_dict()
    for name, target in fake.state_dict(keep_vars=True).items():
        streaming.lazy(target, (lambda n: lambda: real[n])(name))
    return fake


lazy_tower = lazy_of(tower, build_vision_tower(preset, device="meta"))
lazy_tower.rotary_pos_emb = tower.rotary_pos_emb
lazy_projectors = lazy_of(projectors, build_projectors(preset, device="meta"))
comp = vision_tower_component(preset, lazy_tower, lazy_projectors)
print(f"built in {time.perf_counter() - t0:.0f}s; lazy {streaming.lazy_bytes(comp.build_module()) / 2**30:.2f} GiB "
      f"(budget {components.FULL_VERIFY_BYTES / 2**30:.1f} GiB)", flush=True)
t0 = time.perf_counter()
report = export_onnx(comp, comp.build_module(), out / "semantic_encoder.onnx", seed=0)
summary = {k: report.get(k) for k in ("ok", "method", "blocks", "bytes_compared", "worst_cosine", "worst_max_abs_err",
                                       "sample")}
summary["seconds"] = round(time.perf_counter() - t0, 1)
summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
summary["per_case"] = [(c["block"], c["dims"], {o: (f["cosine"], f["max_abs_err"]) for o, f in c["outputs"].items()})
                       for c in report["cases"]]
print(json.dumps(summary, indent=1))
