"""Derived figures (per-image latency, bandwidth against the floor, ratios against the targets, memory split) and the
three outputs: results.json, results.md and chart.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

RUNTIME, REFERENCE, ONE_THREAD = "runtime fp32", "reference (transformers)", "runtime fp32, 1 thread"
TEXT_RT, TEXT_PEER, INT8 = "runtime text decode", "onnxruntime-genai text decode", "runtime int8"
SEQ = "sequential guidance (second forward)"
LOOP = "runtime loop (batched guidance, active head, io binding)"
FULL_HEAD = "full head, forced tokens one by one"
NO_IO = "io binding off (session.run, outputs copied)"
SPIN = "intra-op spinning on (onnxruntime's default)"


def _m(s: dict) -> float:
    return s["median"]


def runtime_image(entry: dict, pick: str = "median") -> dict:
    """Per-image stages of the runtime from its probe: codes x step time, pixel step averaged over the image."""
    g = entry["grid"]
    sem, pix = g[0] * g[1], g[2] * g[3]
    pixel_step = (entry["pixel_step_s"][pick] + entry["pixel_step_late_s"][pick]) / 2
    stages = {"prefill": entry["prefill_s"][pick], "semantic": sem * entry["semantic_step_s"][pick],
              "pixel": pix * pixel_step, "image_decode": entry["image_decode_s"][pick]}
    stages["total"] = sum(stages.values())
    return stages


def reference_image(entry: dict, pick: str = "median") -> dict:
    """Per-image stages of the reference, as for the runtime: the semantic level at the image-start step, the
    pixel level at the mean of the start and end steps (runs without the end probe: the start step)."""
    g = entry["grid"]
    sem_tokens = g[0] * g[1] + g[0] + 2  # <start_of_level0>, codes, <end_of_line>s, <end_of_level0>
    pix_tokens = entry["num_tokens"] - 1 - sem_tokens
    step = entry["token_step_s"][pick]
    late = entry.get("token_step_late_s", entry["token_step_s"])[pick]
    stages = {"prefill": entry["prefill_s"][pick], "semantic": sem_tokens * step,
              "pixel": pix_tokens * (step + late) / 2, "image_decode": entry["image_decode_s"][pick]}
    stages["total"] = sum(stages.values())
    return stages


def _image(entry: dict, kind) -> dict:
    out = {pick: kind(entry, pick) for pick in ("median", "min", "max")}
    out["measured_total"] = entry.get("measured", {}).get("total")
    return out


def analyse(r: dict) -> dict:
    comps = r["manifest"]["components"]
    bw = r["bandwidth"]["best"]["bytes_per_s"]
    body = comps["llm"]["bytes"]
    heads = {w: comps[f"lm_head_{w}"]["bytes"] for w in ("text", "semantic", "pixel")}
    full_head = sum(heads.values())
    step_bytes = {"runtime semantic step": body + heads["semantic"], "runtime pixel step": body + heads["pixel"],
                  "runtime text step": body + heads["text"],
                  "reference token (2 sequential forwards, full head)": 2 * (body + full_head),
                  "peer text step (full head)": body + full_head}
    d: dict = {"read_bandwidth_GBps": bw / 1e9, "weight_bytes_per_step": step_bytes,
               "floor_s_per_step": {k: v / bw for k, v in step_bytes.items()}, "images": {}, "ratios": {},
               "bandwidth_fraction": {}, "memory": {}, "targets": []}
    c = r["contenders"]
    rt = c.get(RUNTIME)
    ref = c.get(REFERENCE)
    for res, entry in (rt or {}).get("resolutions", {}).items():
        images = {RUNTIME: _image(entry, runtime_image)}
        if INT8 in c and res in c[INT8]["resolutions"]:
            images[INT8] = _image(c[INT8]["resolutions"][res], runtime_image)
        if ref and res in ref["resolutions"]:
            images[REFERENCE] = _image(ref["resolutions"][res], reference_image)
            d["ratios"][f"runtime vs reference per image {res}"] = (images[REFERENCE]["median"]["total"]
                                                                    / images[RUNTIME]["median"]["total"])
        for name, im in images.items():
            im["tokens_per_s"] = entry["num_tokens"] / im["median"]["total"]
        d["images"][res] = images
        d["bandwidth_fraction"][f"semantic step {res}"] = (step_bytes["runtime semantic step"] / bw
                                                           / _m(entry["semantic_step_s"]))
        d["bandwidth_fraction"][f"pixel step, image start {res}"] = (step_bytes["runtime pixel step"] / bw
                                                                    / _m(entry["pixel_step_s"]))
        d["bandwidth_fraction"][f"pixel step, image end {res}"] = (step_bytes["runtime pixel step"] / bw
                                                                  / _m(entry["pixel_step_late_s"]))
        if ref and res in ref["resolutions"]:
            d["bandwidth_fraction"][f"reference token {res}"] = (
                step_bytes["reference token (2 sequential forwards, full head)"] / bw
                / _m(ref["resolutions"][res]["token_step_s"]))
            if "token_step_late_s" in ref["resolutions"][res]:
                d["bandwidth_fraction"][f"reference token, image end {res}"] = (
                    step_bytes["reference token (2 sequential forwards, full head)"] / bw
                    / _m(ref["resolutions"][res]["token_step_late_s"]))
    one = c.get(ONE_THREAD)
    if one and rt:
        res = next(iter(one["resolutions"]))
        d["ratios"][f"2 threads vs 1 thread per image {res}"] = (
            runtime_image(one["resolutions"][res])["total"] / runtime_image(rt["resolutions"][res])["total"])
    ab = r.get("ablations")
    if ab:
        per = ab["per_code_s"]
        d["ratios"]["batched vs sequential guidance (per code)"] = _m(per[SEQ]) / _m(per[LOOP])
        d["ratios"]["active head + no head on forced vs full head (per code)"] = _m(per[FULL_HEAD]) / _m(per[LOOP])
        d["ratios"]["io binding + in-place cache writes vs session.run (per code)"] = _m(per[NO_IO]) / _m(per[LOOP])
        if SPIN in per:
            d["ratios"]["spinning off vs on (per code)"] = _m(per[SPIN]) / _m(per[LOOP])
        sweep = ab["step_vs_context_s"]
        ctx = sorted(sweep, key=int)
        d["ratios"][f"step time at context {ctx[-1]} vs {ctx[0]}"] = _m(sweep[ctx[-1]]) / _m(sweep[ctx[0]])
    trt, tpe = c.get(TEXT_RT), c.get(TEXT_PEER)
    if trt:
        d["bandwidth_fraction"]["runtime text step"] = step_bytes["runtime text step"] / bw / _m(trt["decode_step_s"])
    if tpe:
        d["bandwidth_fraction"]["peer text step"] = step_bytes["peer text step (full head)"] / bw / _m(tpe["decode_step_s"])
    if trt and tpe:
        d["ratios"]["text decode runtime vs onnxruntime-genai (tokens/s)"] = (trt["decode_tokens_per_s"]
                                                                            / tpe["decode_tokens_per_s"])
    if rt:
        w = rt["weights"]
        graphs = sum(w["graphs"].values())
        codebooks = w["tables"]["semantic_codebook"] + w["tables"]["pixel_codebook"]
        kv = max(rt["kv_cache_bytes"].values())
        peak = rt["memory"]["peak_rss_generate_bytes"]
        base = graphs + codebooks + kv
        m = {"runtime peak while generating": peak, "runtime peak incl. loading": rt["memory"]["peak_rss_load_bytes"],
             "weights: graphs": graphs, "weights: codebooks": codebooks,
             "weights: embedding table (not loaded: rows read from the file on demand)": w["tables"]["embed_tokens"],
             "kv cache preallocated (largest resolution)": kv,
             "budget 1.25 x (graphs + codebooks + kv)": 1.25 * base}
        for res, entry in rt["resolutions"].items():
            for phase, value in entry.get("peak_rss_bytes", {}).items():
                m[f"runtime peak, {phase} {res}"] = value
        m["runtime resident before loading (python + libraries)"] = rt["memory"].get("rss_before_load_bytes")
        whole = [(res, e["peak_rss_bytes"]["whole_image"]) for res, e in rt["resolutions"].items()
                 if "whole_image" in e.get("peak_rss_bytes", {})]
        if whole:  # measured first, on a fresh pipeline: what a process generating that image holds
            m["runtime peak, whole image (fresh pipeline) / (graphs + codebooks + kv)"] = whole[0][1] / base
            m["whole image resolution"] = whole[0][0]
        m["runtime peak / (graphs + codebooks + kv)"] = peak / base
        if ref:
            m["reference peak while generating"] = ref["memory"]["peak_rss_generate_bytes"]
            m["reference peak incl. loading"] = ref["memory"]["peak_rss_load_bytes"]
        d["memory"] = m
    i8 = r.get("int8_vs_fp32")
    if i8:
        from illume_rt.bench.int8 import ratio_rows

        d["ratios"].update(ratio_rows(i8))
    d["targets"] = _targets(d, i8)
    return d


def _targets(d: dict, int8: dict | None = None) -> list[dict]:
    rows = []

    def add(name, target, value, ok, note=""):
        rows.append({"target": name, "goal": target, "reached": value, "met": ok, "note": note})

    for key, v in d["ratios"].items():
        if key.startswith("runtime vs reference"):
            add(key, ">= 3.0x", v, v >= 3.0,
                "both estimated from probes at the start and the end of the image")
    v = d["ratios"].get("batched vs sequential guidance (per code)")
    if v is not None:
        add("batched vs sequential guidance", ">= 1.7x", v, v >= 1.7,
            "" if v >= 1.7 else "a batch of 2 rows is not free on CPU: the matmul work doubles; only weight "
                                "reads are shared, and 2 cores do not keep the GEMM memory-bound")
    fr = [v for k, v in d["bandwidth_fraction"].items() if k.startswith(("semantic step", "pixel step"))]
    if fr:
        worst = min(fr)
        add("decode steps vs bandwidth floor", ">= 60%", worst, worst >= 0.6,
            "" if worst >= 0.6 else "worst step; see the bandwidth table for each")
    v = d["ratios"].get("text decode runtime vs onnxruntime-genai (tokens/s)")
    if v is not None:
        add("text decoding vs onnxruntime-genai", ">= 1.0x", v, v >= 1.0)
    m = d.get("memory") or {}
    if m:
        ratio = m["runtime peak / (graphs + codebooks + kv)"]
        whole = m.get("runtime peak, whole image (fresh pipeline) / (graphs + codebooks + kv)")
        if whole is not None:
            add(f"runtime peak memory / (weights + kv), one {m['whole image resolution']} image", "<= 1.25", whole,
                whole <= 1.25, f"fresh pipeline; over all phases of the benchmark process: {ratio:.2f}")
        else:
            add("runtime peak memory / (weights + kv)", "<= 1.25", ratio, ratio <= 1.25)
        if "reference peak while generating" in m:
            ok = m["runtime peak while generating"] < m["reference peak while generating"]
            add("runtime peak < reference peak", "runtime lower",
                m["runtime peak while generating"] / m["reference peak while generating"], ok)
    if int8:
        from illume_rt.bench.int8 import target_row

        rows.append(target_row(int8))
    return rows


def _measured(meas) -> str:
    return "-" if not meas else f"{meas['median']:.1f}"


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def markdown(r: dict) -> str:
    d = r["derived"]
    out = ["# illume-rt benchmark", "", f"command: `{r['command']}`  ", f"created: {r['created_at']}  ",
           f"bundle: `{r['bundle']}` (preset `{r['preset']}`, random weights)  ",
           f"machine: {r['machine'].get('cpu', '?')}, {r['machine'].get('cpu_count')} cores, "
           f"{_gb(r['machine'].get('mem_total_bytes'))} RAM, load average at start {r['machine'].get('loadavg')}  ",
           "versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + "  ",
           f"settings: {json.dumps(r['settings'])}  ",
           f"read bandwidth (same run): {d['read_bandwidth_GBps']:.2f} GB/s ({r['bandwidth']['best']['method']}, "
           f"best: {r['bandwidth']['best']['best_method']})", "",
           "Per-image latency is estimated from probes (the real prompt, then a fixed number of codes per level): "
           "prefill + codes x median step + image decode; spread = the same sum over the min and max repeats. "
           "The reference is timed the same way: at the start of the image, and (pixel level) at its end too.", "",
           "## Targets", "", "| target | goal | reached | met | note |", "|---|---|---|---|---|"]
    for t in d["targets"]:
        value = f"{t['reached']:.2f}" + ("x" if "x" in t["goal"] else "")
        if "%" in t["goal"]:
            value = f"{100 * t['reached']:.0f}%"
        out.append(f"| {t['target']} | {t['goal']} | {value} | {'yes' if t['met'] else 'NO'} | {t['note']} |")
    out += ["", "## Per image (seconds)", "",
            "| resolution | contender | prefill | semantic | pixel | image decode | total (median) | spread | "
            "tokens/s | measured whole image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res, images in d["images"].items():
        for name, im in images.items():
            s = im["median"]
            meas = im.get("measured_total")
            out.append(f"| {res} | {name} | {s['prefill']:.2f} | {s['semantic']:.1f} | {s['pixel']:.1f} | "
                       f"{s['image_decode']:.2f} | **{s['total']:.1f}** | {im['min']['total']:.1f}-"
                       f"{im['max']['total']:.1f} | {im['tokens_per_s']:.2f} | "
                       f"{_measured(meas)} |")
    out += ["", "## Ratios (same run)", "", "| comparison | ratio |", "|---|---|"]
    out += [f"| {k} | {v:.2f}x |" for k, v in d["ratios"].items()]
    out += ["", "## Decode steps against the memory-bandwidth floor", "",
            "| step | weight bytes | floor at measured bandwidth |", "|---|---|---|"]
    out += [f"| {k} | {_gb(v)} | {d['floor_s_per_step'][k] * 1e3:.0f} ms |" for k, v in d["weight_bytes_per_step"].items()]
    out += ["", "| measured step | fraction of the floor |", "|---|---|"]
    out += [f"| {k} | {100 * v:.0f}% |" for k, v in d["bandwidth_fraction"].items()]
    if r.get("int8_vs_fp32"):
        from illume_rt.bench.int8 import markdown_section

        out += [""] + markdown_section(r["int8_vs_fp32"])
    ab = r.get("ablations")
    if ab:
        out += ["", f"## Loop variants ({ab['resolution']} probe, {ab['probe_codes_per_level']} codes per level, "
                "interleaved repeats)", "", "| variant | seconds per code (median) | min-max |", "|---|---|---|"]
        out += [f"| {k} | {v['median']:.3f} | {v['min']:.3f}-{v['max']:.3f} |" for k, v in ab["per_code_s"].items()]
        out += ["", "| cached context | step time (median) |", "|---|---|"]
        out += [f"| {k} | {v['median'] * 1e3:.0f} ms |" for k, v in sorted(ab["step_vs_context_s"].items(),
                                                                           key=lambda kv: int(kv[0]))]
    c = r["contenders"]
    texts = [n for n in (TEXT_RT, TEXT_PEER) if n in c]
    if texts:
        out += ["", "## Text decoding on the same body (batch 1, greedy)", "",
                "| contender | head | decode step (median) | tokens/s | first token | peak while generating |",
                "|---|---|---|---|---|---|"]
        for n in texts:
            t = c[n]
            out.append(f"| {n} | {t['head']} | {t['decode_step_s']['median'] * 1e3:.0f} ms | "
                       f"{t['decode_tokens_per_s']:.2f} | {t['first_token_s']['median']:.2f} s | "
                       f"{_gb(t['memory']['peak_rss_generate_bytes'])} |")
    if d.get("memory"):
        out += ["", "## Memory (peak resident set, each contender in its own process)", "", "| figure | value |",
                "|---|---|"]
        out += [f"| {k} | {v:.2f} |" if "/ (" in k else f"| {k} | {v} |" if isinstance(v, str) else f"| {k} | {_gb(v)} |"
                for k, v in d["memory"].items()]
    for label, error in (r.get("errors") or {}).items():
        out += ["", f"**{label} failed**: `{error.strip().splitlines()[-1] if error.strip() else error}`"]
    out += ["", f"INT8: {r['int8']}.  Peer: {r['peer']}.  Whole run: {r.get('wall_s', 0):.0f} s.", ""]
    return "\n".join(out)


def chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = r["derived"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    labels, bottoms, x = [], {}, 0
    colors = {"prefill": "#999999", "semantic": "#4c72b0", "pixel": "#55a868", "image_decode": "#c44e52"}
    for res, images in d["images"].items():
        for name, im in images.items():
            base = 0.0
            for stage, color in colors.items():
                v = im["median"][stage]
                ax.bar(x, v, bottom=base, color=color, label=stage if stage not in bottoms else None)
                bottoms[stage] = True
                base += v
            ax.errorbar(x, base, yerr=[[base - im["min"]["total"]], [im["max"]["total"] - base]], color="k",
                        capsize=3)
            labels.append(f"{res}\n{name.split(' (')[0]}")
            x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("seconds per image")
    ax.set_title("per image (stacked by stage)")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = list(d["ratios"])
    vals = [d["ratios"][n] for n in names]
    ax.barh(range(len(names)), vals, color="#8172b2")
    ax.set_yticks(range(len(names)), [n[:48] for n in names], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed-up (x)")
    ax.set_title("ratios, same run")
    ax = axes[2]
    ab = r.get("ablations")
    if ab:
        sweep = sorted(((int(k), v["median"]) for k, v in ab["step_vs_context_s"].items()))
        ax.plot([s[0] for s in sweep], [s[1] * 1e3 for s in sweep], "o-", label="runtime step (batch 2)")
        floor = d["floor_s_per_step"]["runtime pixel step"] * 1e3
        ax.axhline(floor, color="r", ls="--", label="bandwidth floor (pixel step)")
        ax.set_ylim(0, max(s[1] for s in sweep) * 1.3e3)
        ax.set_xlabel("cached positions")
        ax.set_ylabel("ms per step")
        ax.legend(fontsize=7)
    ax.set_title("step time vs context")
    fig.suptitle(f"illume-rt bench ({r['preset']} preset, {r['machine'].get('cpu_count')} cores, "
                 f"{d['read_bandwidth_GBps']:.1f} GB/s read)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, write in (("results.json", lambda p: p.write_text(json.dumps(results, indent=1))),
                        ("results.md", lambda p: p.write_text(markdown(results))),
                        ("chart.png", lambda p: chart(results, p))):
        tmp = out_dir / f".tmp-{name}"
        write(tmp)
        os.replace(tmp, out_dir / name)
