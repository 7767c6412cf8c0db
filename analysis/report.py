"""Figures, CSV files and the summary of an analysis (matplotlib, Agg; files written atomically)."""

import csv
import dataclasses
import io
import os

import numpy as np

from adm_common.files import atomic_write_text
from evaluations.table import markdown_table, new_figure, save_png

from .trace import STATS, shown_step_numbers

CURVE_COLUMNS = ("step", "timestep") + STATS + ("n",)
ENTROPY_COLUMNS = ("step", "timestep", "block", "tokens", "entropy", "max_entropy", "normalized_entropy")
COMPARE_COLUMNS = ("kind", "step", "timestep", "pag_rms", "guidance_share", "eps_rms")
# The terms and corrections beyond PAG, SAG and CG (issue 21): (size column, share column, label, colour); each is
# drawn and tabulated only where it is on, in the same colour in both panels of curves.png.
EXTRA_TERMS = (("icg_rms", "icg_share", "ICG term", "C4"), ("apg_rms", "apg_share", "APG correction", "C5"),
               ("rescale_rms", "rescale_share", "rescale correction", "C6"))

# Their settings, named in the summary where they differ from their defaults.
BEYOND_SETTINGS = ("icg_scale", "apg_eta", "apg_norm_threshold", "apg_momentum", "guidance_rescale")


def _extra_terms_on(rows):
    """The EXTRA_TERMS entries with a non-zero size at some step of ``rows``."""
    return [term for term in EXTRA_TERMS if any(r[term[0]] for r in rows)]


SHARE_AXIS = ("guidance share of the step", "|guidance part| / (|guidance part| + |unguided step|)")


def _timestep_axis(ax, ylabel, title):
    """Timesteps on the x axis, in sampling order (right to left), with a grid; ``ylabel`` and ``title``."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("timestep (sampling runs right to left)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)


def write_csv(path, columns, rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(["" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                      for c in columns] for row in rows)
    atomic_write_text(path, buf.getvalue())
    return path


def _tile_rgb(image, size):
    """(C, H, W) tensor in [-1, 1] -> (size, size, 3) floats in [0, 1] (nearest-neighbour enlarged)."""
    array = np.clip((image.numpy() + 1) / 2, 0, 1)
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
    return _enlarge(array.transpose(1, 2, 0), size)


def _tile_heat(values, size, vmax, cmap="magma"):
    """(H, W) values -> (size, size, 3) colours of ``cmap`` on [0, vmax]."""
    from matplotlib import colormaps

    scaled = np.clip(np.asarray(values, dtype=np.float64) / max(vmax, 1e-12), 0, 1)
    return _enlarge(colormaps[cmap](scaled)[..., :3], size)


def _enlarge(array, size):
    """Nearest-neighbour resize of (H, W, ...) to (size, size, ...)."""
    rows = np.arange(size) * array.shape[0] // size
    cols = np.arange(size) * array.shape[1] // size
    return array[rows][:, cols]


def _mosaic_figure(tiles, row_labels, col_labels, title, path, tile_inches=0.9, colorbar=None):
    """One image of ``tiles`` (rows of (S, S, 3) arrays, white gaps), labelled rows and columns: far faster
    than one matplotlib axes per tile. ``colorbar``: (cmap, vmax, label) for a colour scale."""
    size = tiles[0][0].shape[0]
    gap = max(1, size // 16)
    rows, cols = len(tiles), len(tiles[0])
    canvas = np.ones((rows * (size + gap) - gap, cols * (size + gap) - gap, 3))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = tile
    fig = new_figure(tile_inches * cols + 1.8, tile_inches * rows + 0.7)
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest")
    centers = [i * (size + gap) + size / 2 - 0.5 for i in range(max(rows, cols))]
    ax.set_yticks(centers[:rows], row_labels, fontsize=7)
    ax.set_xticks(centers[:cols], col_labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if colorbar is not None:
        from matplotlib import cm, colors

        cmap, vmax, label = colorbar
        bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(0, vmax), cmap), ax=ax, fraction=0.025, pad=0.01)
        bar.set_label(label, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8)
    return save_png(fig, path, dpi=110)


STRIP_ROWS = (("x_t", "x_t"), ("x0_clean", "x0 clean"), ("x0_perturbed", "x0 perturbed"),
              ("x0_guided", "x0 guided"), ("pag_term", "|s (eps - eps_pert)|"))
TILE = 64  # pixels per tile: small images are enlarged (nearest), larger ones shown as they are


def write_strip(trace, row, path, title=""):
    """One sample's strip: x_t, the clean / perturbed / guided x0 predictions and the PAG term's per-pixel norm
    (one colour scale over the strip) at the shown steps."""
    size = max(TILE, trace.images["x_t"].shape[-1])
    heat = trace.images["pag_term"][:, row, 0].numpy()
    vmax = max(float(heat.max()), 1e-8)
    tiles = [[_tile_heat(heat[c], size, vmax) if key == "pag_term" else _tile_rgb(trace.images[key][c, row], size)
              for c in range(len(trace.shown))] for key, _ in STRIP_ROWS]
    return _mosaic_figure(tiles, [label for _, label in STRIP_ROWS],
                          [f"t={trace.timesteps[s]}" for s in trace.shown], title, path,
                          colorbar=("magma", vmax, "PAG term, L2 over channels"))


def write_curves(trace, out_dir, title=""):
    """curves.csv (one row per step, means over the samples) and curves.png; returns their paths."""
    rows = trace.curve_rows()
    csv_path = write_csv(os.path.join(out_dir, "curves.csv"), CURVE_COLUMNS, rows)
    t = [r["timestep"] for r in rows]
    panels = 3 if trace.cg_on else 2
    fig = new_figure(4.4 * panels, 3.4)
    axes = fig.subplots(1, panels)
    fig.subplots_adjust(wspace=0.3)
    ax = axes[0]
    ax.plot(t, [r["eps_rms"] for r in rows], color="gray", linestyle="--", label="eps (model)")
    extra = _extra_terms_on(rows)
    lines = (("pag_rms", "PAG term", "C0"), ("sag_rms", "SAG term", "C1"), ("cg_rms", "CG term", "C2"),
             *[(size, label, colour) for size, _, label, colour in extra])
    for key, label, colour in lines:
        values = [r[key] for r in rows]
        if key == "pag_rms" or any(values):
            ax.plot(t, values, marker=".", color=colour, label=label)
    _timestep_axis(ax, "RMS per sample (eps units)", "size of each guidance term")
    ax.legend(fontsize=7)
    axes[1].plot(t, [r["guidance_share"] for r in rows], marker=".", color="C3", label="all guidance")
    for _, share, label, colour in extra:
        axes[1].plot(t, [r[share] for r in rows], marker=".", color=colour, label=label)
    if extra:
        axes[1].legend(fontsize=7)
    _timestep_axis(axes[1], *SHARE_AXIS)
    if trace.cg_on:
        axes[2].plot(t, [r["cos_pag_cg"] if r["cos_pag_cg"] is not None else np.nan for r in rows],
                     marker=".", color="C4")
        axes[2].axhline(0, color="gray", linewidth=0.8)
        _timestep_axis(axes[2], "cosine similarity", "PAG term vs CG term")
    fig.suptitle(title + f" (mean over {len(trace.indices)} samples)", fontsize=9, y=1.02)
    return [csv_path, save_png(fig, os.path.join(out_dir, "curves.png"), dpi=100)]


def write_entropy(trace, out_dir, title=""):
    """entropy.csv (one row per step and block) and entropy.png (entropy / log T against the timestep)."""
    rows = trace.entropy_rows()
    csv_path = write_csv(os.path.join(out_dir, "entropy.csv"), ENTROPY_COLUMNS, rows)
    fig = new_figure(6, 3.6)
    ax = fig.subplots()
    for block in trace.entropy:
        mine = [r for r in rows if r["block"] == block]
        side = "x".join(str(v) for v in trace.grids[block])
        ax.plot([r["timestep"] for r in mine], [r["normalized_entropy"] for r in mine], marker=".",
                label=f"{block} ({side})")
    ax.set_ylim(0, 1.02)
    _timestep_axis(ax, "entropy / log T (0 = identity, 1 = uniform)", title + " attention entropy of the clean pass")
    ax.legend(fontsize=7)
    return [csv_path, save_png(fig, os.path.join(out_dir, "entropy.png"), dpi=100)]


def write_attention_maps(trace, row, path, title=""):
    """One sample's head-averaged attention maps of the clean pass: a row per block, a column per (shown step,
    query token), each map scaled to its own maximum; the top row is the clean x0 prediction with the query
    token marked."""
    blocks = list(trace.maps)
    queries = len(next(iter(trace.query_tokens.values())))
    cols = [(j, q) for j in shown_step_numbers(len(trace.shown), 4) for q in range(queries)]
    size = max(TILE, trace.images["x_t"].shape[-1])
    tiles = [[], *[[] for _ in blocks]]
    for j, q in cols:
        image = _tile_rgb(trace.images["x0_clean"][j, row], size).copy()
        _mark(image, trace.query_tokens[blocks[0]][q], trace.grids[blocks[0]], (0.0, 1.0, 1.0))
        tiles[0].append(image)
        for r, block in enumerate(blocks, start=1):
            attention = trace.maps[block][j, row, q].reshape(trace.grids[block]).numpy()
            tile = _tile_heat(attention, size, float(attention.max()), cmap="viridis").copy()
            _mark(tile, trace.query_tokens[block][q], trace.grids[block], (1.0, 0.0, 0.0))
            tiles[r].append(tile)
    labels = ["x0 clean"] + [f"{b} ({'x'.join(str(v) for v in trace.grids[b])})" for b in blocks]
    return _mosaic_figure(tiles, labels, [f"t={trace.timesteps[trace.shown[j]]} q{q}" for j, q in cols],
                          title + " attention of query q (+) over the image, clean pass", path, tile_inches=0.8)


def _mark(tile, token, grid, colour):
    """A small cross on a tile at the centre of ``token`` (row-major on ``grid`` = (h, w))."""
    (h, w), size = grid, tile.shape[0]
    cy, cx, arm = int((token // w + 0.5) / h * size), int((token % w + 0.5) / w * size), max(2, size // 16)
    tile[max(0, cy - arm):cy + arm + 1, min(cx, size - 1)] = colour
    tile[min(cy, size - 1), max(0, cx - arm):cx + arm + 1] = colour


def write_kind_comparison(reference, x0_by_kind, row, path, title=""):
    """Rows: x_t, the clean x0 and each perturbation kind's perturbed x0, on the same x_t (the reference trace's
    trajectory); columns: the shown steps."""
    size = max(TILE, reference.images["x_t"].shape[-1])
    names = list(x0_by_kind)
    steps = range(len(reference.shown))
    tiles = [[_tile_rgb(reference.images["x_t"][c, row], size) for c in steps]]
    tiles += [[_tile_rgb(x0_by_kind[name][c, row], size) for c in steps] for name in names]
    labels = ["x_t"] + [name if name == "clean" else f"{name} (perturbed)" for name in names]
    return _mosaic_figure(tiles, labels, [f"t={reference.timesteps[s]}" for s in reference.shown], title, path)


def write_kind_change(reference, x0_by_kind, out_dir):
    """compare_x0.csv: for each kind and shown step, the RMS of (perturbed x0 - clean x0) over the strip samples
    (pixels in [-1, 1]): how much each perturbation degrades the prediction on the same x_t."""
    clean = x0_by_kind["clean"]
    rows = [{"kind": kind, "step": step, "timestep": reference.timesteps[step],
             "x0_rms_change": float((x0[j] - clean[j]).flatten(1).pow(2).mean(dim=1).sqrt().mean())}
            for kind, x0 in x0_by_kind.items() if kind != "clean" for j, step in enumerate(reference.shown)]
    return write_csv(os.path.join(out_dir, "compare_x0.csv"), ("kind", "step", "timestep", "x0_rms_change"), rows)


def write_compare_curves(traces, out_dir):
    """compare_curves.csv and .png: the PAG term's size and the guidance share of each analysed kind."""
    rows = [{"kind": kind, **{c: r[c] for c in COMPARE_COLUMNS[1:]}} for kind, trace in traces.items()
            for r in trace.curve_rows()]
    csv_path = write_csv(os.path.join(out_dir, "compare_curves.csv"), COMPARE_COLUMNS, rows)
    fig = new_figure(9.4, 3.4)
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(wspace=0.3)
    for kind in traces:
        mine = [r for r in rows if r["kind"] == kind]
        t = [r["timestep"] for r in mine]
        axes[0].plot(t, [r["pag_rms"] for r in mine], marker=".", label=kind)
        axes[1].plot(t, [r["guidance_share"] for r in mine], marker=".", label=kind)
    _timestep_axis(axes[0], "RMS of s (eps - eps_perturbed)", "size of the PAG term (mean over samples)")
    _timestep_axis(axes[1], *SHARE_AXIS)
    for ax in axes:
        ax.legend(fontsize=7)
    return [csv_path, save_png(fig, os.path.join(out_dir, "compare_curves.png"), dpi=100)]


def _md_table(columns, rows):
    return "\n".join(markdown_table(columns, [["-" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r[c], float)
                                                else r[c] for c in columns] for r in rows]))


def summary_markdown(name, command, traces, files, comparison_files, seconds):
    """summary.md: what was run, the key numbers, and a link to every file (paths relative to the summary)."""
    lines = [f"# Analysis: {name}", "", f"Command: `{command}`", "", f"Run time: {seconds:.1f} s.", ""]
    for kind, trace in traces.items():
        c = trace.config
        cg = f"classifier guidance {c.classifier_scale:g}" if trace.cg_on else "no classifier guidance"
        defaults = {f.name: f.default for f in dataclasses.fields(c)}
        beyond = "".join(f", {key} {getattr(c, key):g}" for key in BEYOND_SETTINGS if getattr(c, key) != defaults[key])
        lines += [f"## {kind}", "",
                  f"pag_scale {c.pag_scale:g}, pag_layers {', '.join(c.pag_layers) or '-'}, sag_scale "
                  f"{c.sag_scale:g}{beyond}, {cg}; samples {trace.indices} (strips: {trace.strip_indices}).", ""]
        lines += [f"- [{os.path.basename(p)}]({p})" for p in files[kind]]
        shown = set(trace.shown)
        every_step = trace.curve_rows()
        rows = [r for r in every_step if r["step"] in shown]
        extra = [column for size, share, _, _ in _extra_terms_on(every_step) for column in (size, share)]
        lines += ["", "Per step (means over the samples; `curves.csv` has every step):", "",
                  _md_table(["step", "timestep", "pag_scale", "eps_rms", "pag_rms", "sag_rms", "cg_rms",
                             "cos_pag_cg", "guidance_share", *extra], rows), ""]
        entropy = [r for r in trace.entropy_rows() if r["step"] in (trace.shown[0], trace.shown[-1])]
        lines += ["Attention entropy / log T of the clean pass at the first and last step (0 = identity map, "
                  "1 = uniform):", "", _md_table(["step", "timestep", "block", "tokens", "normalized_entropy"],
                                                 entropy), ""]
    if comparison_files:
        lines += ["## Perturbation kinds side by side", "",
                  "The perturbed pass's x0 of each kind on the same x_t (the first kind's trajectory), and the "
                  "PAG term of each fully analysed kind:", ""]
        lines += [f"- [{os.path.basename(p)}]({p})" for p in comparison_files]
        lines.append("")
    return "\n".join(lines)
