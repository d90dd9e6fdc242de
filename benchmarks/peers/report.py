"""The outputs of bench_peers: peers.json (everything), table.md (printed too) and peers.png (median bars with
min-max whiskers, one panel per setting)."""

from __future__ import annotations

import json
from pathlib import Path

AGREE_COLUMNS = (("out", "Δout"), ("x", "Δx grad"), ("router", "Δrouter grad"), ("experts", "Δexpert grads"))


def _e(v) -> str:
    return "0" if v == 0 else f"{v:.1e}"


def _ratios(rows: list[dict]) -> None:
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        ref = by_key.get(r.get("ref") or "")
        r["ratio"] = r["median_ms"] / ref["median_ms"] if ref else None


def setting_table(rows: list[dict]) -> list[str]:
    vs_fp32 = any("agreement_vs_fp32" in r for r in rows)
    head = ["library", "dtype", "median ms", "min–max ms", "÷ moeflux", *(h for _, h in AGREE_COLUMNS),
            "out rel. err", "tokens off"]
    if vs_fp32:
        head.append("vs fp32 moeflux: Δout, rel. err, tokens off")
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        agree = r.get("agreement")
        cells = [r["label"], r["dtype"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}–{r['max_ms']:.1f}",
                 f"{r['ratio']:.2f}" if r.get("ratio") is not None else "1 (ref)" if not r.get("ref") else "—"]
        for key, _ in AGREE_COLUMNS:
            cells.append(_e(agree[key]) if agree else "—")
        cells += [_e(agree["out_rel_median"]), str(agree["tokens_off"])] if agree else ["—", "—"]
        if vs_fp32:
            v = r.get("agreement_vs_fp32")
            cells.append(f"{_e(v['out'])}, {_e(v['out_rel_median'])}, {v['tokens_off']}" if v else "—")
        note = r.get("note", "")
        if agree and "out_all" in agree:
            note += (f" (Δout/Δx on the {agree['tokens_compared']} tokens that lost no slot; all tokens: "
                     f"Δout {_e(agree['out_all'])})")
        cells.append(note.strip())
        lines.append("| " + " | ".join(cells) + " |")
    scale = next((r["agreement"]["scale"] for r in rows if r.get("agreement")), None)
    if scale:
        lines.append("")
        lines.append("Reference magnitudes (max |moeflux|): " + ", ".join(
            f"{h[1:]} {scale[k]:.2g}" for k, h in AGREE_COLUMNS) + ". Out rel. err: median over tokens of "
            "|Δ row| / |row|. Tokens off: output row off by more than 1e-3 (fp32) / 5e-2 (bf16) of the largest "
            "output: a different routing (near-tie) or a dropped slot.")
    return lines


def floor_lines(rows: list[dict]) -> list[str]:
    by_key = {r["key"]: r for r in rows}
    out = []
    for r in rows:
        if "floor" not in r["key"] or not r.get("ref") or r["ref"] not in by_key:
            continue
        layer = by_key[r["ref"]]["median_ms"]
        what = "its expert FFN" if "expert_ffn" in r["label"] else "these GEMMs"
        out.append(f"- {r['label']} ({r['dtype']}): {r['median_ms']:.1f} ms = {100 * r['median_ms'] / layer:.0f}% "
                   f"of moeflux's layer; moeflux outside {what}: {layer - r['median_ms']:.1f} ms "
                   f"= {100 * (1 - r['median_ms'] / layer):.0f}% of the layer")
    return out


def sweep_table(rows: list[dict]) -> list[str]:
    lines = ["| E | d_ffn | expert params | moeflux median ms | min–max ms | floor torch._grouped_mm ms "
             "| floor moeflux.ops.grouped_mm ms | moeflux outside its GEMMs | busiest expert rows | empty experts |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_e: dict[int, dict] = {}
    for r in rows:
        by_e.setdefault(r["experts"], {})[r["kind"]] = r
    for e in sorted(by_e):
        g = by_e[e]
        m = g.get("moeflux")
        if m is None:
            continue
        ft, fm = g.get("floor-torch"), g.get("floor-moeflux")
        cells = [str(e), str(m["d_ffn"]), f"{m['expert_params'] / 1e6:.0f}M", f"{m['median_ms']:.1f}",
                 f"{m['min_ms']:.1f}–{m['max_ms']:.1f}", f"{ft['median_ms']:.1f}" if ft else "—",
                 f"{fm['median_ms']:.1f}" if fm else "—",
                 f"{100 * (1 - fm['median_ms'] / m['median_ms']):.0f}%" if fm else "—", str(m.get("max_rows", "—")),
                 str(m.get("empty_experts", "—"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# moeflux's MoE layer against peer libraries", "",
             f"Command: `{meta['command']}` ({meta['wall_s']:.0f} s wall)", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; " + ", ".join(
                 f"{k} {v}" for k, v in meta["versions"].items()), "",
             f"Layer: {meta['spec']['tokens']} tokens per rank, d_model {meta['spec']['d_model']}, d_ffn "
             f"{meta['spec']['d_ffn']}, {meta['spec']['experts']} experts, top-{meta['spec']['top_k']}, SwiGLU, "
             f"Mixtral routing (softmax, top-k, renormalised); forward + backward of sum(out * G) for a fixed "
             f"random G (out.backward(G)), parameter grads dropped (set to None) before each step. Input skew "
             f"{meta['skew']}" + (f": busiest expert {meta['load']['max_over_mean']:.2f}x the mean load, capacity "
                                  f"{meta['capacity_factor']} drops {100 * meta['load']['dropped_fraction']:.1f}% "
                                  f"of the slots (rank 0's tokens)." if meta.get("load") else "."), "",
             f"Timing: {meta['warmup']} warmup step(s), then {meta['rounds']} interleaved rounds (each runs every "
             f"layer of its part once, order rotated by one per round); median and min–max per layer; ÷ moeflux "
             f"= median / median of moeflux in the same setting. Threads: {meta['threads']}. Load average "
             f"(1 min) at start / end: {meta['loadavg'][0]:.1f} / {meta['loadavg'][1]:.1f} (other work on "
             f"the machine widens min–max).", "",
             "Agreement: max abs difference against moeflux after one step with the same weights and inputs "
             "(out, input grad, router weight grad, max over the experts' gate/up/down weight grads).", ""]
    settings: dict[str, list[dict]] = {}
    for r in result["rows"]:
        settings.setdefault(r["setting"], []).append(r)
    for name, rows in settings.items():
        lines += [f"## {name}", ""] + setting_table(rows) + [""]
        fl = floor_lines(rows)
        if fl:
            lines += ["Expert GEMMs alone / moeflux's expert FFN op alone (same weights and segment sizes as "
                      "moeflux's forward; medians; min–max in the table):", ""] + fl + [""]
    if result.get("sweep"):
        s = result["sweep_meta"]
        lines += [f"## E sweep: moeflux alone, 1 process, fp32, {s['tokens']} tokens, top-{s['top_k']}, d_model "
                  f"{s['d_model']}, d_ffn fixed at {s['d_ffn']}", "",
                  "With top-k fixed, expert FLOPs per token (top_k x 3 GEMMs x 2 d_model d_ffn) do not depend on E, "
                  "so a fixed d_ffn keeps them constant; expert parameters (and their gradients) grow with E.", ""]
        lines += sweep_table(result["sweep"]) + [""]
    if result["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['key']} ({s['setting']}): {s['reason']}" for s in result["skipped"]]
        lines.append("")
    if result.get("caveats"):
        lines += ["## Caveats", ""] + [f"- {c}" for c in result["caveats"]] + [""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[dict]] = {}
    for r in result["rows"]:
        panels.setdefault(r["setting"], []).append(r)
    if result.get("sweep"):
        panels["E sweep (moeflux, fp32)"] = [
            {**r, "label": f"E={r['experts']} " + ("moeflux" if r["kind"] == "moeflux" else r["label"])}
            for r in result["sweep"]]
    heights = [0.35 * len(rows) + 0.9 for rows in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], panels.items()):
        short = {"float32": "fp32", "bfloat16": "bf16"}
        labels = [f"{r['label']} [{short.get(r.get('dtype'), r.get('dtype'))}]" if r.get("dtype") else r["label"]
                  for r in rows]
        med = [r["median_ms"] for r in rows]
        err = [[m - r["min_ms"] for m, r in zip(med, rows)], [r["max_ms"] - m for m, r in zip(med, rows)]]
        colors = ["#7f7f7f" if "floor" in r["key"] else "#1f77b4" if "moeflux" in r["key"] else "#ff7f0e"
                  for r in rows]  # floors (GEMMs / expert FFN alone) grey, moeflux blue, peers orange
        y = range(len(rows))
        ax.barh(y, med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        for i, (m, r) in enumerate(zip(med, rows)):
            text = f"{m:.0f} ms" + (f"  ({r['ratio']:.2f}x)" if r.get("ratio") is not None else "")
            ax.text(r["max_ms"], i, "  " + text, va="center", fontsize=7)
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xlim(0, max(r["max_ms"] for r in rows) * 1.35)
    axes[-1, 0].set_xlabel("ms per forward + backward (median, whiskers min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    _ratios(result["rows"])
    text = markdown(result)
    (out / "peers.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(text)
    plot(result, out / "peers.png")
    return text
