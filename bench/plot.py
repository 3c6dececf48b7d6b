"""``python -m bench.plot FILE.jsonl [-o FILE.png]``: step time and peak memory against N.

One column per batch size, two rows per model (step time above, peak memory below). Where a
(model, batch) has several N: one line per method (atlas once per backend) on log scales, the
floor (the plain model, no task vectors) a dashed horizontal line, out-of-memory points red
crosses on the top edge. Where it has a single N (the CPU default): horizontal bars, one per
method, with the value written on each bar. When a file holds several precisions, storages or
partition counts, they become separate lines or bars (the label says which). A machine that was not
quiet during the run (bench/quiet.py) is said in red under the title, with the reasons, and so are
the ratios the run's own spread does not support; the PNG's Description carries the same text.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import quiet
from .summary import METHOD_ORDER, ceiling_row, history_rows, load_rows, machine_notes, merged, ratios

COLORS = {
    "naive": "#d62728", "merge_once": "#ff7f0e", "fusionbench": "#8c564b", "floor": "#555555",
    "atlas:torch": "#1f77b4", "atlas:triton": "#2ca02c", "atlas:ext": "#9467bd", "atlas:cuda": "#9467bd",
}
VARIANT_STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]
FIELDS = (("step_ms", 1.0, "step time (ms)"), ("peak_bytes", 1e-9, "peak memory (GB)"))


def _series_name(r: dict) -> str:
    return r["method"] + (f":{r['backend']}" if r.get("backend") else "")


def _good(r: dict, field: str) -> bool:
    return r.get(field) is not None and not r.get("oom") and not r.get("error")


def _variant_label(varying, var) -> str:
    if not varying:
        return ""
    return " (" + ", ".join(f"K={v}" if a == "partitions" else f"{v}" for a, v in zip(varying, var)) + ")"


def _log_axis(axis):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _line_panel(ax, pr, field, scale, varying, style, marker, handles):
    ns = sorted({r["n_task_vectors"] for r in pr if r.get("n_task_vectors")})
    series, ooms = {}, []
    for r in pr:
        if r["method"] != "floor":
            series.setdefault((_series_name(r), tuple(r.get(a) for a in varying)), []).append(r)
    for (name, var), rs in sorted(series.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        rs = sorted(rs, key=lambda r: r["n_task_vectors"])
        ooms += [r["n_task_vectors"] for r in rs if r.get("oom")]
        good = [r for r in rs if _good(r, field)]
        if not good:
            continue
        label = name + _variant_label(varying, var)
        h = ax.plot([r["n_task_vectors"] for r in good], [r[field] * scale for r in good],
                    linestyle=style.get(var, "-"), marker=marker.get(var, "o"), ms=5,
                    color=COLORS.get(name), label=label)[0]
        handles.setdefault(label, h)
    for r in pr:
        if r["method"] == "floor" and _good(r, field):
            lab = "floor (plain model)" + (f" ({r['precision']})" if "precision" in varying else "")
            h = ax.axhline(r[field] * scale, color=COLORS["floor"], linestyle="--", linewidth=1.2)
            handles.setdefault(lab, h)
    ax.set_yscale("log")
    _log_axis(ax.yaxis)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlim(min(ns) / 1.3, max(ns) * 1.3)
    ax.grid(True, alpha=0.3)
    if ooms:
        top = ax.get_ylim()[1]
        h = ax.scatter(ooms, [top] * len(ooms), marker="x", color="red", s=60, zorder=5, clip_on=False)
        handles.setdefault("out of memory", h)


def _bar_panel(ax, pr, field, scale, varying, unit):
    rs = sorted(pr, key=lambda r: (METHOD_ORDER.get(r["method"], 9), r.get("backend") or "",
                                   str(tuple(r.get(a) for a in varying))))
    labels, vals, colors, notes, errs = [], [], [], [], [[], []]
    for r in rs:
        name = _series_name(r)
        var = tuple(r.get(a) for a in varying)
        if r["method"] == "floor":
            var = tuple(r.get(a) if a == "precision" else None for a in varying)
            label = "floor (plain model)" + _variant_label([a for a, v in zip(varying, var) if v is not None],
                                                           [v for v in var if v is not None])
        else:
            label = name + _variant_label(varying, var)
        labels.append(label)
        colors.append(COLORS.get(name, "#999999"))
        lo = hi = 0.0
        if _good(r, field):
            v = r[field] * scale
            vals.append(v)
            notes.append(f"{v:,.{0 if unit == 'ms' else 2}f} {unit}")
            if field == "step_ms" and r.get("step_ms_p20") is not None:
                lo, hi = max(0.0, v - r["step_ms_p20"]), max(0.0, r["step_ms_p80"] - v)
                notes[-1] += f" (p20-p80 {r['step_ms_p20']:,.0f}-{r['step_ms_p80']:,.0f})"
        else:
            vals.append(0.0)
            notes.append("out of memory" if r.get("oom") else "error")
        errs[0].append(lo)
        errs[1].append(hi)
    y = list(range(len(labels)))[::-1]
    ax.barh(y, vals, color=colors, height=0.6, xerr=errs if any(errs[1]) or any(errs[0]) else None,
            error_kw=dict(ecolor="black", capsize=3, lw=1))
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    ends = [v + e for v, e in zip(vals, errs[1])]
    top = max(ends) if ends and max(ends) > 0 else 1.0
    for yi, v, note in zip(y, ends, notes):
        ax.text(v + top * 0.015, yi, note, va="center", fontsize=8.5)
    ax.set_xlim(0, top * (1.75 if field == "step_ms" else 1.35))
    ax.grid(True, axis="x", alpha=0.3)


def warning_lines(path) -> list:
    """The plot's warning under its title: why the machine was not quiet, and how many ratios the
    run's spread does not support (empty when neither)."""
    loaded = load_rows(path)
    notes = machine_notes(loaded, history_rows(path))
    flagged = [f"{k} {d['model']} b{d['batch']} {d['storage']} {d['backend']}"
               for d in ratios(loaded) for k in d["flags"]]
    lines = []
    if notes:
        lines.append(f"NOT A QUIET MACHINE: {quiet.NOT_QUIET_WHY}")
        lines += [f"- {n}" for n in notes]
    if flagged:
        lines.append(f"{len(flagged)} ratio(s) not supported by this run's own spread (marked {quiet.FLAG} in the "
                     f"table): " + "; ".join(flagged[:4]) + (" ..." if len(flagged) > 4 else ""))
    return lines


def plot(path, out=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = [r for r in merged(load_rows(path)) if r.get("method") != "ceiling" and r.get("model")]
    if not rows:
        raise ValueError(f"{path}: no benchmark rows to plot")
    out = Path(out) if out else path.with_suffix(".png")
    # attributes that vary in this file go into the labels
    varying = [a for a in ("precision", "storage", "partitions")
               if len({r.get(a) for r in rows if r["method"] != "floor" or a == "precision"} - {None}) > 1]
    variants = sorted({tuple(r.get(a) for a in varying) for r in rows if r["method"] != "floor"}, key=str)
    style = {v: VARIANT_STYLES[i % len(VARIANT_STYLES)] for i, v in enumerate(variants)}
    marker = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(variants)}

    order = []
    for r in rows:
        if r["model"] not in order:
            order.append(r["model"])
    models = order
    batches = sorted({r["batch"] for r in rows})
    panels = {(r["model"], r["batch"]) for r in rows}
    ncol, nrow = len(batches), 2 * len(models)
    width = max(7.5, 4.8 * ncol + 0.8)
    fig, axes = plt.subplots(nrow, ncol, figsize=(width, 3.1 * nrow + 1.4), squeeze=False)
    handles: dict = {}
    for mi, model in enumerate(models):
        for c, batch in enumerate(batches):
            pr = [r for r in rows if r["model"] == model and r["batch"] == batch]
            ns = {r["n_task_vectors"] for r in pr if r.get("n_task_vectors")}
            for row_i, (field, scale, ylabel) in enumerate(FIELDS):
                ax = axes[2 * mi + row_i][c]
                if (model, batch) not in panels:
                    ax.set_visible(False)
                    continue
                what = ylabel.split(" (")[0]
                if len(ns) > 1:
                    _line_panel(ax, pr, field, scale, varying, style, marker, handles)
                    ax.set_ylabel(ylabel)
                    if row_i == 1:
                        ax.set_xlabel("N (task vectors)")
                    ax.set_title(f"{model}, batch {batch}: {what}", fontsize=10)
                else:
                    _bar_panel(ax, pr, field, scale, varying, "ms" if field == "step_ms" else "GB")
                    ax.set_xlabel(ylabel)
                    n_txt = f", N={next(iter(ns))}" if ns else ""
                    ax.set_title(f"{model}, batch {batch}{n_txt}: {what}", fontsize=10)
    meta = rows[0]
    ceil = ceiling_row(merged(load_rows(path)))
    title = (f"{meta.get('device')} | {meta.get('date')} | torch {meta.get('torch')} | "
             f"atlas_kernels {meta.get('atlas_kernels')}")
    if ceil:
        title += (f"\nceiling: copy {ceil['copy_gbps']:.0f} GB/s (read+write), "
                  f"matmul {ceil['matmul_tflops']:.2f} TFLOP/s ({ceil.get('matmul_dtype', '')})")
    fig.suptitle(title, fontsize=10)
    h_in = fig.get_size_inches()[1]
    warn = warning_lines(path)
    top_in = 0.55
    if warn:
        import textwrap

        wrapped = [w for line in warn for w in textwrap.wrap(line, width=int(width * 15), subsequent_indent="  ")]
        fig.text(0.5, 1 - 0.5 / h_in, "\n".join(wrapped), ha="center", va="top", fontsize=8.5, color="#c00000")
        top_in = 0.5 + 0.125 * len(wrapped) + 0.1
    bottom = 0.0
    if handles:
        per_row = max(1, int(width // 2.9))
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
                   ncol=min(per_row, len(handles)), fontsize=9, frameon=False)
        bottom = (0.25 + 0.22 * ((len(handles) + per_row - 1) // per_row)) / h_in
    fig.tight_layout(rect=(0, bottom, 1, 1 - top_in / h_in))
    import io

    from atlas_kernels._io import atomic_write

    buf = io.BytesIO()
    fmt = str(out).rsplit(".", 1)[-1] if "." in str(out) else "png"
    meta = {"Description": "\n".join([title] + warn)} if fmt == "png" else None
    fig.savefig(buf, dpi=110, format=fmt, metadata=meta)
    with atomic_write(out, "wb") as fh:
        fh.write(buf.getvalue())
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    p.add_argument("jsonl", type=Path)
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: beside the JSONL)")
    a = p.parse_args(argv)
    print(plot(a.jsonl, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
