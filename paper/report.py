"""The paper-reproduction report: markdown tables like the paper's Tables 2, 5 and 6 and Figure 2, plus
findings stated from the numbers. Input is the results dict `paper.protocol` writes as JSON, so a
report can be re-rendered from a stored run without training anything.
"""
from __future__ import annotations

import math
from typing import Any

from tabulate import tabulate

from .options import STAGES, VARIANTS

TABLE2 = (("cma-clip", "CMA-CLIP"), ("fine-tuned-clip", "Fine-tuned CLIP (zero-shot prompts)"),
          ("raw-clip", "Raw CLIP (zero-shot prompts)"), ("image-only", "Image only"), ("text-only", "Text only"))
TABLE6 = (("cma-clip", "CMA-CLIP"), ("no-modality-attention", "CMA-CLIP w/o MA"),
          ("no-attention", "CMA-CLIP w/o (MA+SA)"))
CONDITIONS = (("clean", "original titles"), ("label_words_removed", "label words removed"),
              ("titles_swapped", "titles swapped"))
NAMES = dict(TABLE2 + TABLE6)
# The paper's average recall at 90% precision on MRWPA (Tables 2 and 6), quoted only to compare directions.
NOT_IN_RUN = "Not in this run (its results predate this table, or it had no model to compute it for)."
PAPER_MEAN_RECALL = {"raw-clip": 0.425, "fine-tuned-clip": 0.405, "cma-clip": 0.534,
                     "no-modality-attention": 0.475, "no-attention": 0.458}


def in_model_order(by_model: dict[str, Any]) -> list[tuple[str, Any]]:
    """Items of a per-model dict in the tables' model order (a stored JSON has them sorted by name)."""
    order = [*VARIANTS, *NAMES]
    return sorted(by_model.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def pct(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table of cells formatted here (percent, signs, bold): tabulate lays them out as given."""
    return tabulate(rows, header, tablefmt="github", disable_numparse=True)


def _metric_row(name: str, test: dict[str, Any], tasks: list[str]) -> list[str]:
    cells = [f"{pct(test[t]['recall_at_precision'])} / {pct(test[t]['accuracy'])}" for t in tasks]
    return [name, *cells, f"**{pct(test['mean_recall_at_precision'])}** / {pct(test['mean_accuracy'])}"]


def metric_table(results: dict[str, Any], rows: tuple[tuple[str, str], ...]) -> str:
    """Recall at the target precision / accuracy (%) per task and their means over tasks."""
    tasks = results["protocol"]["tasks"]
    body = []
    for key, name in rows:
        model = results["models"].get(key)
        if model is None:
            continue
        if "not_run" in model:
            body.append([name, *("not run" for _ in tasks), f"not run: {model['not_run']}"])
        else:
            body.append(_metric_row(name, model["test"], tasks))
    return markdown(["method", *tasks, "mean"], body)


def f1_table(results: dict[str, Any], rows: tuple[tuple[str, str], ...]) -> str:
    """Macro-F1 (%) per task: unlike recall at 90% precision it weighs rare classes like common ones."""
    tasks = results["protocol"]["tasks"]
    body = []
    for key, name in rows:
        test = results["models"].get(key, {}).get("test")
        if test is not None:
            body.append([name, *(pct(test[t]["macro_f1"]) for t in tasks), pct(test["mean_macro_f1"])])
    return markdown(["method", *tasks, "mean"], body)


def saturated(results: dict[str, Any]) -> list[str]:
    """Model/task cells whose accuracy reaches the target precision: there the loosest threshold keeps
    every product, so recall at that precision equals accuracy and stops separating the methods."""
    target = results["protocol"]["target_precision"]
    return [f"{NAMES.get(k, k)} / {t}" for k, m in results["models"].items() if "test" in m
            for t in results["protocol"]["tasks"] if m["test"][t]["accuracy"] >= target]


def _lambda_cell(cond: dict[str, Any], clean: dict[str, Any], task: str) -> str:
    lam, base = cond[task].get("image_weight"), clean[task].get("image_weight")
    if lam is None or (isinstance(lam, float) and math.isnan(lam)):
        return "—"
    return f"{lam:.3f} ({lam - base:+.3f})"


def robustness_table(results: dict[str, Any]) -> str:
    """Per model and condition: recall / accuracy per task, mean recall, and mean lambda (shift from clean)."""
    tasks = results["protocol"]["tasks"]
    header = ["model", "titles", *(f"{t} R/Acc" for t in tasks), "mean R", *(f"{t} λ (Δ)" for t in tasks)]
    body = []
    for key, runs in in_model_order(results["robustness"]):
        clean = runs["clean"]
        for cond, label in CONDITIONS:
            m = runs[cond]
            cells = [f"{pct(m[t]['recall_at_precision'])} / {pct(m[t]['accuracy'])}" for t in tasks]
            lams = [_lambda_cell(m, clean, t) for t in tasks]
            body.append([NAMES.get(key, key), label, *cells, pct(m["mean_recall_at_precision"]), *lams])
    return markdown(header, body)


def robustness_summary(results: dict[str, Any]) -> str:
    """Mean accuracy / mean recall at precision per title condition (rows) and model (columns): Table 5 in
    one glance, for docs/benchmarks.md."""
    models = in_model_order(results["robustness"])
    header = ["test titles", *(NAMES.get(key, key) for key, _ in models)]
    body = [[label, *(f"{pct(runs[cond]['mean_accuracy'])} / {pct(runs[cond]['mean_recall_at_precision'])}"
                      for _, runs in models)] for cond, label in CONDITIONS]
    return markdown(header, body)


def _calibration_cell(cell: dict[str, Any] | None, target: float) -> str:
    if cell is None:
        return "—"
    precision = cell["precision"]
    shown = pct(precision)
    if precision is not None and not math.isnan(precision) and precision < target:
        shown = f"**{shown}**"  # the threshold breaks its promise here
    return f"{shown} / {pct(cell['coverage'])}"


def calibration_table(results: dict[str, Any]) -> str:
    """Per model and title condition: precision reached / coverage (%) at each task's stored threshold."""
    tasks, target = results["protocol"]["tasks"], results["protocol"]["target_precision"]
    if not results.get("calibration"):
        return NOT_IN_RUN
    body = [[NAMES.get(key, key), label, *(_calibration_cell(runs[cond].get(t), target) for t in tasks)]
            for key, runs in in_model_order(results.get("calibration", {})) for cond, label in CONDITIONS
            if cond in runs]
    return markdown(["model", "titles", *(f"{t} P / coverage" for t in tasks)], body)


def _signed(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:+.3f}"


def contributions_table(results: dict[str, Any]) -> str:
    """Per fused model and title condition, per task: λ next to the title's and the image's contribution
    (mean confidence lost when that input is withheld)."""
    tasks = results["protocol"]["tasks"]
    if not results.get("contributions"):
        return NOT_IN_RUN
    header = ["model", "titles", *(f"{t} {column}" for t in tasks for column in ("λ", "title", "image"))]
    body = []
    for key, runs in in_model_order(results.get("contributions", {})):
        for cond, label in CONDITIONS:
            if cond not in runs:
                continue
            lam = results["robustness"].get(key, {}).get(cond, {})
            cells = [cell for t in tasks for cell in (
                (f"{lam[t]['image_weight']:.3f}", _signed(runs[cond][t]["title"]), _signed(runs[cond][t]["image"]))
                if t in lam else ("—", "—", "—"))]
            body.append([NAMES.get(key, key), label, *cells])
    return markdown(header, body)


def _in_stage_order(stages) -> list[str]:
    """Stage names in training order (the stored JSON sorts its keys)."""
    return sorted(stages, key=STAGES.index)


def _removed(row: dict[str, Any]) -> str:
    settings = "; ".join(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in row["removed"][stage].items())
                         for stage in _in_stage_order(row["removed"]))
    return f"{row['group']} ({settings})"


def _retrained(row: dict[str, Any]) -> str:
    start = f"from {row['reused_stages'][-1]}" if row["reused_stages"] else "from scratch"
    return f"{', '.join(_in_stage_order(row['stages']))} ({start})"


def _ablation_cell(test: dict[str, Any], full: dict[str, Any] | None) -> str:
    acc, rec = test["mean_accuracy"], test["mean_recall_at_precision"]
    cell = f"{pct(acc)} / {pct(rec)}"
    if full is None:
        return cell
    return (f"{cell} ({100 * (acc - full['mean_accuracy']):+.1f} / "
            f"{100 * (rec - full['mean_recall_at_precision']):+.1f})")


def ablation_table(results: dict[str, Any]) -> str:
    """One line per training choice removed: mean accuracy / mean recall (%) per title condition, and the
    difference from the full CMA-CLIP in points."""
    ablations = results.get("ablations")
    if ablations is None:
        return NOT_IN_RUN
    if "not_run" in ablations:
        return f"Not run: {ablations['not_run']}."
    if not ablations["rows"]:
        return (f"The config turns no training choice on ({', '.join(ablations['groups'])} are off in every "
                "stage, and align has no epochs): nothing to ablate.")
    full = results["robustness"].get("cma-clip", {})
    body = [["nothing (CMA-CLIP)", "—", *(_ablation_cell(full[c], None) if c in full else "—" for c, _ in CONDITIONS)]]
    body += [[_removed(row), _retrained(row), *(_ablation_cell(row["test"][c], full.get(c)) for c, _ in CONDITIONS)]
             for row in ablations["rows"]]
    return markdown(["removed", "retrained", *(f"{label}: acc / R (Δ)" for _, label in CONDITIONS)], body)


def noise_table(results: dict[str, Any]) -> str:
    stats, tasks = results["noise"], results["protocol"]["tasks"]
    body = [[label, *(pct(stats["label_named"][cond][t]) for t in tasks)] for cond, label in CONDITIONS]
    return markdown(["test titles", *(f"name the {t} label" for t in tasks)], body)


def _mean(results: dict[str, Any], key: str, metric: str = "mean_recall_at_precision") -> float | None:
    model = results["models"].get(key)
    return None if model is None or "test" not in model else model["test"][metric]


def _points(a: float, b: float) -> str:
    return f"{100 * (a - b):+.1f} points"


def accuracy_standard_error(results: dict[str, Any]) -> float:
    """The largest binomial standard error of a test accuracy in the tables: the size of a difference
    that one seed and this test set cannot tell from noise."""
    errors = [math.sqrt(m["test"][t]["accuracy"] * (1 - m["test"][t]["accuracy"]) / max(m["test"][t]["n"], 1))
              for m in results["models"].values() if "test" in m for t in results["protocol"]["tasks"]]
    return max(errors, default=float("nan"))


def _fusion_findings(results: dict[str, Any]) -> list[str]:
    out, tasks = [], results["protocol"]["tasks"]
    models = results["models"]
    if not all(k in models and "test" in models[k] for k in ("cma-clip", "image-only", "text-only")):
        return out
    for task in tasks:
        r = {k: models[k]["test"][task]["recall_at_precision"] for k in ("cma-clip", "image-only", "text-only")}
        best = " = ".join(NAMES[k] for k in r if r[k] == max(r.values()))  # ties are named together
        named = results["noise"]["label_named"]["clean"][task]
        out.append(f"{task}: recall at {results['protocol']['target_precision']:.0%} precision is "
                   f"{pct(r['cma-clip'])} fused, {pct(r['image-only'])} image only, {pct(r['text-only'])} text only "
                   f"(best: {best}); {pct(named)}% of test titles name the {task} label.")
    return out


def _ablation_findings(results: dict[str, Any]) -> list[str]:
    full, no_ma, none = (_mean(results, k) for k in ("cma-clip", "no-modality-attention", "no-attention"))
    if None in (full, no_ma, none):
        return []
    paper = PAPER_MEAN_RECALL
    return [f"Removing modality attention changes mean recall by {_points(no_ma, full)}; removing sequence "
            f"attention as well changes it by a further {_points(none, no_ma)} (paper, MRWPA: "
            f"{_points(paper['no-modality-attention'], paper['cma-clip'])} and "
            f"{_points(paper['no-attention'], paper['no-modality-attention'])})."]


def _removed_accuracy_findings(results: dict[str, Any]) -> list[str]:
    """Per task, accuracy once the title no longer names the labels: fused models against each modality."""
    runs, out = results["robustness"], []
    keys = [k for k in ("cma-clip", "no-modality-attention", "no-attention", "image-only", "text-only") if k in runs]
    for task in results["protocol"]["tasks"]:
        cells = ", ".join(f"{NAMES[k]} {pct(runs[k]['label_words_removed'][task]['accuracy'])}" for k in keys)
        out.append(f"With label words removed, {task} accuracy: {cells}.")
    return out


def _lambda_findings(results: dict[str, Any]) -> list[str]:
    """λ weighs I'[CLS] against T'[EOT] *after* sequence attention, where each has attended to both
    modalities; set the task that leans most on the image side against its accuracy on swapped titles."""
    cma = results["robustness"].get("cma-clip")
    if not cma:
        return []
    task = max(results["protocol"]["tasks"], key=lambda t: cma["clean"][t]["image_weight"])
    clean, swapped = cma["clean"][task], cma["titles_swapped"][task]
    return [f"CMA-CLIP puts λ = {clean['image_weight']:.2f} on the image side for {task}, yet its {task} accuracy "
            f"goes from {pct(clean['accuracy'])} to {pct(swapped['accuracy'])} when titles are swapped: after "
            "sequence attention I'[CLS] has attended to the title tokens, so λ weighs two mixtures of both "
            "modalities, not pixels against words."]


def _robustness_findings(results: dict[str, Any]) -> list[str]:
    out = []
    for key, runs in results["robustness"].items():
        if key not in ("cma-clip", "no-modality-attention"):
            continue
        clean = runs["clean"]["mean_recall_at_precision"]
        drops = ", ".join(f"{label}: {_points(runs[c]['mean_recall_at_precision'], clean)}"
                          for c, label in CONDITIONS[1:])
        out.append(f"{NAMES[key]} mean recall vs original titles — {drops}.")
    cma = results["robustness"].get("cma-clip")
    if cma:
        for cond, label in CONDITIONS[1:]:
            shifts = ", ".join(f"{t} {cma[cond][t]['image_weight'] - cma['clean'][t]['image_weight']:+.3f}"
                               for t in results["protocol"]["tasks"])
            out.append(f"CMA-CLIP mean λ (image weight) shift with {label}: {shifts}.")
    return out


def _calibration_findings(results: dict[str, Any]) -> list[str]:
    """Per title condition, which model/task thresholds still reach the target precision."""
    target, tasks, out = results["protocol"]["target_precision"], results["protocol"]["tasks"], []
    calibration = results.get("calibration", {})
    for cond, label in CONDITIONS:
        cells = [(NAMES.get(k, k), t, runs[cond][t]) for k, runs in in_model_order(calibration) if cond in runs
                 for t in tasks if t in runs[cond]]
        missed = [f"{m} / {t} {pct(c['precision'])}" for m, t, c in cells
                  if c["precision"] is not None and not math.isnan(c["precision"]) and c["precision"] < target]
        empty = [f"{m} / {t}" for m, t, c in cells if c["coverage"] == 0]
        if cells:
            out.append(f"With {label}, the stored thresholds reach {target:.0%} precision in "
                       f"{len(cells) - len(missed) - len(empty)} of {len(cells)} model/task cells"
                       + (f"; below it: {', '.join(missed)}" if missed else "")
                       + (f"; nothing kept: {', '.join(empty)}" if empty else "") + ".")
    return out


CONTRIBUTION_STEP = 0.001  # the table's last digit: a smaller shift is reported as none


def _directions(runs: dict[str, Any], modality: str, tasks: list[str]) -> str:
    """Per corrupted title condition, the tasks where the modality's contribution rises and falls."""
    parts = []
    for cond, label in CONDITIONS[1:]:
        shift = {t: runs[cond][t][modality] - runs["clean"][t][modality] for t in tasks}
        up = [t for t in tasks if shift[t] >= CONTRIBUTION_STEP]
        down = [t for t in tasks if shift[t] <= -CONTRIBUTION_STEP]
        moves = [f"{word} for {', '.join(ts)}" for word, ts in (("rises", up), ("falls", down)) if ts]
        parts.append(f"with {label} it {' and '.join(moves) or 'does not move'}")
    return "; ".join(parts)


def _contribution_findings(results: dict[str, Any]) -> list[str]:
    """How each modality's contribution moves from the original titles to the corrupted ones."""
    out, tasks = [], results["protocol"]["tasks"]
    order = " → ".join(label for _, label in CONDITIONS)
    for key, runs in in_model_order(results.get("contributions", {})):
        if any(c not in runs for c, _ in CONDITIONS):
            continue
        for modality in ("title", "image"):
            values = ", ".join(f"{t} " + " → ".join(_signed(runs[c][t][modality]) for c, _ in CONDITIONS)
                               for t in tasks)
            out.append(f"{NAMES.get(key, key)} {modality} contribution ({order}): {values}; "
                       f"{_directions(runs, modality, tasks)}.")
    return out


def _baseline_findings(results: dict[str, Any]) -> list[str]:
    cma, ft = _mean(results, "cma-clip"), _mean(results, "fine-tuned-clip")
    if cma is None or ft is None:
        return []
    paper = PAPER_MEAN_RECALL
    out = [f"CMA-CLIP vs the contrastively fine-tuned CLIP with zero-shot prompts: {_points(cma, ft)} mean "
           f"recall (paper, MRWPA: {_points(paper['cma-clip'], paper['fine-tuned-clip'])})."]
    retrieval = results["models"]["fine-tuned-clip"].get("title_retrieval")
    if retrieval:
        out.append(f"The contrastive fine-tuning did align the towers — image-to-title top-1 retrieval over the "
                   f"{retrieval['n']} test pairs is {pct(retrieval['top1'])}% (chance {100 * retrieval['chance']:.2f}%) "
                   f"— yet prompts made of label names reach {pct(_mean(results, 'fine-tuned-clip', 'mean_accuracy'))}% "
                   "mean accuracy: without web-scale pre-training the text tower has never seen a bare label.")
    return out


def _saturation_findings(results: dict[str, Any]) -> list[str]:
    cells = saturated(results)
    if not cells:
        return []
    return [f"Accuracy reaches {results['protocol']['target_precision']:.0%} in {len(cells)} model/task cells "
            f"({'; '.join(cells)}): there recall at that precision equals accuracy, so compare macro-F1 too."]


def findings(results: dict[str, Any]) -> list[str]:
    """Statements computed from the numbers; the reader judges them against the standard error."""
    return (_fusion_findings(results) + _ablation_findings(results) + _baseline_findings(results)
            + _robustness_findings(results) + _removed_accuracy_findings(results) + _lambda_findings(results)
            + _contribution_findings(results) + _calibration_findings(results) + _saturation_findings(results))


def _protocol_section(results: dict[str, Any]) -> list[str]:
    p, t = results["protocol"], results["timing"]
    data = p["data"]
    init = f"pretrained weights `{p['pretrained']}`" if p["pretrained"] else "**random weights** (no pretrained CLIP here)"
    return [
        f"- Data: `{p['catalog']}` — {data['rows_kept']} products ({', '.join(f'{s} {n}' for s, n in data['rows_by_split'].items())}),"
        f" split by md5(product_id) at ingest; input fingerprint `{data['input_fingerprint'][:16]}`, dataset "
        f"fingerprint `{data['dataset_fingerprint']}`; classes {data['classes']}.",
        f"- Model: config `{p['config']}` ({p['parameters_m']:.1f} M parameters), CLIP initialised from {init}; "
        f"precision {p['precision']}; seeds: training {p['seeds']['train']}, title swap {p['seeds']['swap']}.",
        f"- Stages (epochs): {p['stage_epochs']}; contrastive fine-tuning of the CLIP baseline: "
        f"{p['contrastive']['epochs']} epochs at lr {p['contrastive']['lr']}.",
        f"- Run time: {t['total_s'] / 60:.1f} min on {p['machine']['cores']} CPU cores shared with other jobs "
        f"(torch threads: {p.get('threads', p['machine']['threads'])}) "
        f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in t['parts'].items())})"
        + (f"; {t['note']}." if t.get("note") else "."),
        f"- Metric: recall at {p['target_precision']:.0%} precision of the top-1 prediction ranked by confidence "
        f"(threshold chosen on the test set itself, as the paper's metric is defined), and accuracy.",
    ]


def render(results: dict[str, Any], command: str) -> str:
    """The whole report as markdown."""
    se = accuracy_standard_error(results)
    lines = [
        "# CMA-CLIP paper experiments on fashion-small (Myntra products)",
        "",
        f"Reproduce: `{command}`",
        "",
        *_protocol_section(results),
        "",
        "**Read the numbers as a small-scale CPU reproduction, not as the paper's.** "
        + ("CLIP starts from random weights, so nothing here is pre-trained on 400M pairs; " if not results["protocol"]["pretrained"] else "")
        + "the towers are tiny and see 60x80 thumbnails at low resolution. The dataset (Myntra, "
        "color / article type / usage) is not the paper's MRWPA (dresses, color / pattern / style), so only the "
        f"directions of the comparisons carry over. One seed: test accuracies have a binomial standard error of up "
        f"to {pct(se)} points, so smaller differences are not evidence.",
        "",
        "## Table 2 — methods (recall at 90% precision / accuracy, %)",
        "",
        metric_table(results, TABLE2),
        "",
        "## Table 6 — ablation of the cross-modality attentions (recall at 90% precision / accuracy, %)",
        "",
        metric_table(results, TABLE6),
        "",
        "Macro-F1 (%), every class weighted equally:",
        "",
        f1_table(results, TABLE2 + TABLE6[1:]),
        "",
        "## Table 5 — robustness to uninformative titles (same test set)",
        "",
        "Label words removed: every word of each product's color, article type and usage labels is deleted from "
        "its title (case-insensitive, whole words). Titles swapped: each product gets another product's title "
        "(a random derangement). λ is the mean image weight of the task's modality attention (fixed 0.5 without "
        "it); Δ is the shift from the original titles.",
        "",
        noise_table(results),
        "",
        robustness_table(results),
        "",
        "Modality contributions, next to λ: a modality's contribution is the mean drop of the confidence in "
        "the prediction when that input is withheld (the title emptied, or the image blanked to CLIP's mean "
        "colour; `cmaclip/explain.py`), over every test product. Unlike λ, it measures inputs, not the two "
        "embeddings sequence attention has already mixed.",
        "",
        contributions_table(results),
        "",
        "## Calibration: precision reached at the stored threshold",
        "",
        f"Each task's threshold is the one its checkpoint stores, calibrated on the validation split (original "
        f"titles) at {results['protocol']['target_precision']:.0%} precision; it is what scoring abstains below. "
        "P: precision of the test predictions at or above it (bold: below the target); coverage: the share of "
        "labelled test products at or above it (0 when the threshold is infinite, i.e. no validation threshold "
        "reached the target).",
        "",
        calibration_table(results),
        "",
        "## Ablation of the training choices (mean accuracy / mean recall at 90% precision, %)",
        "",
        "Each training choice the config turns on (per stage: title corruption, image augmentation, the "
        "auxiliary modality loss; the align stage) removed in turn; CMA-CLIP retrained from the full run's "
        "checkpoint of the last stage the removal leaves unchanged. Δ: points against the full CMA-CLIP.",
        "",
        ablation_table(results),
        "",
        "## Figure 2 — sequence attention from a title word to image patches",
        "",
        *[f"- `{a['png']}`: {a['title']!r}, word {a['word']!r} (layer {a['layer']})" for a in results["attention"]],
        "",
        "## Findings (computed from the numbers above)",
        "",
        *[f"- {f}" for f in findings(results)],
        "",
    ]
    return "\n".join(lines)


def readme_section(results: dict[str, Any], command: str) -> str:
    """The paper section of docs/benchmarks.md: the latest Table 2 and Table 6 and how to reproduce them."""
    p = results["protocol"]
    init = "pretrained CLIP" if p["pretrained"] else "CLIP from random weights (no pretrained weights offline)"
    return "\n".join([
        "## Paper experiments on real products",
        "",
        f"CMA-CLIP, its ablations and the CLIP baselines on fashion-small ({p['data']['rows_kept']} Myntra "
        f"products; tasks {', '.join(p['tasks'])}), config `{p['config']}`, {init}, "
        f"{results['timing']['total_s'] / 60:.0f} min on {p['machine']['cores']} CPU cores. Recall at 90% "
        "precision / accuracy (%) on the test split:",
        "",
        metric_table(results, TABLE2 + TABLE6[1:]),
        "",
        "When the title does not name the attribute (Table 5: the label words removed from the test titles, or "
        "each title swapped for another product's), mean accuracy / mean recall at 90% precision (%):",
        "",
        robustness_summary(results),
        "",
        f"Reproduce: `{command}` (add `--pretrained <weights>` for the paper's setting). Full report with the "
        "robustness test (Table 5), the modality contributions, the precision reached at the stored thresholds "
        "under each title condition, the ablation of each training choice the config turns on "
        "(`--no-ablations` skips it) and attention maps (Figure 2): `bench/results/paper.md`.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    """Re-render paper.md (and print the docs/benchmarks.md section) from a stored paper.json, without training."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results_json", nargs="?", default="bench/results/paper.json")
    parser.add_argument("--readme", help="also write the docs/benchmarks.md paper section to this file")
    args = parser.parse_args(argv)
    path = Path(args.results_json)
    results = json.loads(path.read_text())
    command = results.get("command") or "HF_HUB_OFFLINE=1 .venv/bin/python bench/paper.py"
    path.with_suffix(".md").write_text(render(results, command))
    if args.readme:
        Path(args.readme).write_text(readme_section(results, command))


if __name__ == "__main__":
    main()
