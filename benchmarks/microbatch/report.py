"""The microbatch benchmark's report: summaries over seeds, the share of the EMA gap recovered
at the smallest B, the markdown tables, the plots, and the results files they go to."""

import numpy as np

from ..common import write_results
from ..digit_scenes import SCENES
from ..stats import gap_recovered, interval, markdown_table, mean_std, percent
from .cell import EVALUATIONS, WEIGHING_GRID

# Paper, Table 1 (ImageNet Prec@1, 2 samples/GPU): EMA 64.80, EN 70.98, EMA at 32 samples 75.98.
PAPER_RECOVERED = (70.98 - 64.80) / (75.98 - 64.80)
PLOTS = ("error_vs_B.png", "alpha_vs_B.png", "curve.png")


def summarize(cells, batch_sizes):
    """{B: {evaluation: {"mean", "std", "values", "seeds"}}} and {B: {estimate: {"alpha", "beta"}}}
    over the cells of each B."""
    errors, coeffs = {}, {}
    for b in batch_sizes:
        rows = sorted((c for c in cells if c["B"] == b), key=lambda c: c["seed"])
        if not rows:
            continue
        errors[b] = {}
        for key in EVALUATIONS:
            values = [r["errors"][key] for r in rows]
            mean, std = mean_std(values)
            errors[b][key] = {
                "mean": mean,
                "std": std,
                "values": values,
                "seeds": [r["seed"] for r in rows],
            }
        coeffs[b] = {
            est: dict(
                zip(
                    ("alpha", "beta"),
                    np.mean([r["mean_coefficients"][est] for r in rows], 0).tolist(),
                )
            )
            for est in rows[0]["mean_coefficients"]
        }
    return errors, coeffs


def gap_report(errors, small):
    """The EMA gap at B = ``small`` and the share each evaluation recovers: from the means over
    seeds, and seed by seed (each seed against its own error at the best B), with a 95% interval
    over seeds. Only seeds present at both B's. The best B is the one with the lowest mean EMA
    error over those seeds among the B's run for the most of ``small``'s seeds, so that a B
    with fewer seeds done cannot set the gap."""

    def by_seed(b, key):
        return dict(zip(errors[b][key]["seeds"], errors[b][key]["values"]))

    def shared(b):
        return sorted(set(errors[small]["ema"]["seeds"]) & set(errors[b]["ema"]["seeds"]))

    def rank(b):
        seeds_b = shared(b)
        return -len(seeds_b), float(np.mean([by_seed(b, "ema")[s] for s in seeds_b]))

    best = min((b for b in errors if b != small), key=rank)
    seeds = shared(best)
    ema_small, ema_best = by_seed(small, "ema"), by_seed(best, "ema")
    mean_small = float(np.mean([ema_small[s] for s in seeds]))
    mean_best = float(np.mean([ema_best[s] for s in seeds]))
    report = {
        "B": small,
        "best_B": best,
        "seeds": seeds,
        "ema_error": mean_small,
        "ema_error_best_B": mean_best,
        "gap": mean_small - mean_best,
        "errors": {},  # at B = small, mean over ``seeds``
        "recovered": {},
        "per_seed": {},
        "interval": {},
        "paper_recovered": PAPER_RECOVERED,
    }
    for key in EVALUATIONS:
        if key == "ema":
            continue
        x = by_seed(small, key)
        report["errors"][key] = float(np.mean([x[s] for s in seeds]))
        report["recovered"][key] = gap_recovered(mean_small, report["errors"][key], mean_best)
        per_seed = [gap_recovered(ema_small[s], x[s], ema_best[s]) for s in seeds]
        report["per_seed"][key] = per_seed
        if seeds and all(v is not None for v in per_seed):
            report["interval"][key] = interval(per_seed)
    return report


def mean_std_text(stats_):
    return "n/a" if stats_ is None else f"{stats_['mean']:.2f} +- {stats_['std']:.2f}"


def tables(results):
    """The report in markdown: errors, alpha/beta, gap recovered, weighing, curve, convergence."""
    s = results["settings"]
    errors = results["summary"]["errors"]
    seeds = ", ".join(map(str, s["seeds"]))
    out = [
        f"## Test error (%) by normalization microbatch B (mean +- std over seeds {seeds})",
        "",
        (
            f"ResNet-20 v2 (widths {'/'.join(map(str, s['widths']))}, maps 32/16/8) on 32x32 digit "
            f"scenes ({s['train_digits_used']} training digits rendered afresh each step, "
            f"{s['test_images']} test and {s['val_images']} validation images); SGD batch "
            f"{s['sgd_batch_size']}, LR {s['lr']:g} cosine, {s['steps']} steps; EN offline: "
            f"{s['offline_iters']} batches; PreciseBN: {s['precise_iters']} batches. Cells done: "
            f"{results['cells_done']} of {results['cells_planned']}."
        ),
        "",
        markdown_table(
            ["B", "seeds"] + list(EVALUATIONS.values()),
            [
                [b, len(errors[b]["ema"]["values"])]
                + [mean_std_text(errors[b][k]) for k in EVALUATIONS]
                for b in errors
            ],
        ),
        "",
        "## Estimated alpha / beta (mean over layers, then over seeds)",
        "",
        markdown_table(
            ["B", "online alpha", "online beta", "offline alpha", "offline beta", "1/B^2"],
            [
                [b]
                + [
                    f"{c[est][k]:.4f}"
                    for est in ("en_online", "en_offline")
                    for k in ("alpha", "beta")
                ]
                + [f"{1 / b**2:.4f}"]
                for b, c in results["summary"]["coefficients"].items()
            ],
        ),
        "",
        "## Inference example weighing: the alpha = beta chosen on validation, per seed",
        "",
        markdown_table(
            ["B", "chosen (seed order)"],
            [
                [b, ", ".join(f"{w:g}" for w in ws)]
                for b, ws in results["summary"]["weighing_chosen"].items()
            ],
        ),
    ]
    gap = results.get("gap")
    if gap is not None:
        out += ["", f"## Share of the EMA gap at B = {gap['B']} recovered", ""]
        if gap["gap"] <= 0:
            out.append(f"No gap: EMA at B = {gap['B']} is the best B here.")
        else:
            out += [
                (
                    f"EMA error {gap['ema_error']:.2f}% at B = {gap['B']}, {gap['ema_error_best_B']:.2f}% "
                    f"at the best B ({gap['best_B']}), seeds {', '.join(map(str, gap['seeds']))}: a gap of "
                    f"{gap['gap']:.2f} points. Share recovered = (EMA - X) / gap, from the means; per "
                    "seed, each seed against its own errors; 95% t-interval over the per-seed shares."
                ),
                "",
                markdown_table(
                    [
                        "evaluation",
                        f"error at B = {gap['B']} (%)",
                        "share recovered",
                        "per seed",
                        "95% interval",
                    ],
                    [
                        [
                            EVALUATIONS[k],
                            f"{gap['errors'][k]:.2f}",
                            percent(v),
                            ", ".join(map(percent, gap["per_seed"][k])),
                            _interval_text(gap["interval"].get(k)),
                        ]
                        for k, v in gap["recovered"].items()
                    ]
                    + [["paper, ImageNet Table 1 (EN)", "", percent(PAPER_RECOVERED), "", ""]],
                ),
            ]
    check = results["summary"].get("convergence")
    if check:
        out += [
            "",
            f"## Convergence check: {s['steps']} steps against {s['check_steps_factor']}x as many",
            "",
            markdown_table(
                [
                    "B",
                    "seed",
                    "steps",
                    "EMA",
                    "EN online",
                    "BN, test groups of B",
                    "longer: steps",
                    "longer: EMA",
                    "longer: EN online",
                    "longer: BN, test groups of B",
                ],
                [
                    [r["B"], r["seed"], r["steps"]]
                    + [f"{r['errors'][k]:.2f}" for k in ("ema", "en_online", "batch")]
                    + [r["longer_steps"]]
                    + [f"{r['longer_errors'][k]:.2f}" for k in ("ema", "en_online", "batch")]
                    for r in check
                ],
            ),
        ]
    return "\n".join(out) + "\n"


def _interval_text(iv):
    if iv is None or iv["low"] is None:
        return "n/a"
    return f"[{100 * iv['low']:.0f}%, {100 * iv['high']:.0f}%]"


def plot(results, output_dir):
    """error_vs_B.png, alpha_vs_B.png and curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    errors = results["summary"]["errors"]
    coeffs = results["summary"]["coefficients"]
    bs = list(errors)
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for i, (key, label) in enumerate(EVALUATIONS.items()):
        mean = np.array([errors[b][key]["mean"] for b in bs])
        std = np.array([errors[b][key]["std"] for b in bs])
        style = ":" if key == "batch" else "-"
        ax.plot(bs, mean, style, marker="o", color=f"C{i}", label=label)
        ax.fill_between(bs, mean - std, mean + std, color=f"C{i}", alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("normalization microbatch B (SGD batch 128)")
    ax.set_ylabel("test error (%)")
    ax.set_title("ResNet-20 v2 on 32x32 digit scenes: mean +- std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_dir / "error_vs_B.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, est in enumerate(("en_online", "en_offline")):
        for key, style in (("alpha", "-"), ("beta", "--")):
            ax.plot(
                bs,
                [coeffs[b][est][key] for b in bs],
                style,
                marker="o",
                color=f"C{i}",
                label=f"{EVALUATIONS[est]} {key}",
            )
    grid = np.array(bs, dtype=float)
    ax.plot(bs, 1 / grid**2, ":", color="gray", label="1/B^2")
    ax.plot(bs, 1 / grid, "-.", color="gray", label="1/B")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("normalization microbatch B")
    ax.set_ylabel("coefficient (mean over layers and seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "alpha_vs_B.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, c in enumerate(c for c in results["cells"] if c["curve"]):
        steps = [p["step"] for p in c["curve"]]
        label = f"B={c['B']} seed {c['seed']}, {c['steps']} steps"
        ax.plot(steps, [p["ema"] for p in c["curve"]], "-", color=f"C{i}", label=f"{label}: EMA")
        ax.plot(
            steps, [p["en_online"] for p in c["curve"]], "--", color=f"C{i}", label=f"{label}: EN"
        )
    ax.set_xlabel("SGD step")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(0, 60)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_dir / "curve.png", dpi=120)
    plt.close(fig)


def write_report(cells, args, where, output_dir, planned, wall_seconds):
    """Rewrite results.json, results.md and the plots from every cell done so far."""
    main_cells = [c for c in cells if c["steps"] == args.steps]
    batch_sizes = sorted(args.batch_sizes)
    errors, coeffs = summarize(main_cells, batch_sizes)
    settings = dict(vars(args))
    settings.update(
        train_digits_used=cells[0]["train_digits"] if cells else None,
        test_images=args.test_digits * args.test_copies,
        val_images=args.val_digits * args.val_copies,
        sgd_batch_size=args.sgd_batch_size,
        scenes=SCENES,
        weighing_grid=list(WEIGHING_GRID),
        std="sample standard deviation over seeds (ddof=1)",
    )
    results = {
        "benchmark": "microbatch",
        "settings": settings,
        "machine": where,
        "cells_planned": len(planned),
        "cells_done": len(cells),
        "summary": {
            "errors": errors,
            "coefficients": coeffs,
            "weighing_chosen": {
                b: [
                    c["example_weighing"]["chosen"]
                    for c in sorted(main_cells, key=lambda c: c["seed"])
                    if c["B"] == b
                ]
                for b in errors
            },
        },
        "cells": cells,
        "wall_seconds_this_invocation": wall_seconds,
    }
    if len(errors) > 1:
        results["gap"] = gap_report(errors, min(errors))
    check = []
    for c in cells:
        if c["steps"] != args.steps:
            base = next(
                (m for m in main_cells if m["seed"] == c["seed"] and m["B"] == c["B"]), None
            )
            if base is not None:
                check.append(
                    {
                        "B": c["B"],
                        "seed": c["seed"],
                        "steps": base["steps"],
                        "errors": base["errors"],
                        "longer_steps": c["steps"],
                        "longer_errors": c["errors"],
                    }
                )
    results["summary"]["convergence"] = check
    text = tables(results)
    write_results(output_dir, results, "# Microbatch benchmark (EvalNorm section 4.1)\n\n" + text)
    if errors:
        plot(results, output_dir)
    return results, text
