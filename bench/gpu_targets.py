"""bench/gpu.sh's last step: the figures of its steps against issue 16's targets on a GPU, as ONE JSON line.

    python bench/gpu_targets.py LOG_FOLDER [--seconds N]

LOG_FOLDER holds <step>.log and <step>.rc for the steps cuda_tests, scoring, train_stages and paper_batch;
each benchmark's figures are the last JSON line of its log.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# Issue 16 (H200): end-to-end scoring with decode in worker processes, the pipeline against the forward
# alone, bf16's top-1 agreement with fp32, and one training step on the paper's batch of 1024.
TARGETS = {"e2e_samples_per_s": 10_000, "e2e_over_forward": 0.85, "bf16_top1_agreement": 0.995}


def step(folder: Path, name: str) -> dict:
    """A step's exit status, and its figures (the last JSON line of its log) if it printed any."""
    log, rc = folder / f"{name}.log", folder / f"{name}.rc"
    text = log.read_text(errors="replace") if log.is_file() else ""
    out = {"rc": int(rc.read_text()) if rc.is_file() else None}
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                out["figures"] = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if out["rc"] != 0:
        out["tail"] = text[-1500:]
    return out


def pytest_counts(text: str) -> dict[str, int]:
    """'3 passed, 1 skipped in 9.1s' -> {'passed': 3, 'skipped': 1}."""
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}


def checks(scoring: dict, paper_batch: dict, tests: dict) -> dict[str, dict]:
    s = scoring.get("figures", {})
    agreement = s.get("top1_agreement_with_fp32") if s.get("precision") == "bf16" else None
    e2e_paper = paper_batch.get("figures", {}).get("paper-vit-b-32", {}).get("end_to_end", {}).get("uncached", {})
    measured = {"e2e_samples_per_s": s.get("e2e_samples_per_s"), "e2e_over_forward": s.get("e2e_over_forward"),
                "bf16_top1_agreement": agreement}
    out = {name: {"target": target, "measured": measured[name],
                  "met": measured[name] is not None and measured[name] >= target} for name, target in TARGETS.items()}
    out["paper_batch_1024_step"] = {"target": "no out-of-memory", "peak_memory_gib": e2e_paper.get("peak_memory_gib"),
                                    "met": paper_batch["rc"] == 0 and "samples_per_s" in e2e_paper}
    out["cuda_tests"] = {"target": "all pass", "counts": tests["counts"],
                         "met": tests["rc"] == 0 and tests["counts"].get("passed", 0) > 0}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", type=Path)
    parser.add_argument("--seconds", type=float)
    args = parser.parse_args(argv)
    steps = {name: step(args.logs, name) for name in ("cuda_tests", "scoring", "train_stages", "paper_batch")}
    steps["cuda_tests"]["counts"] = pytest_counts((args.logs / "cuda_tests.log").read_text(errors="replace")
                                                  if (args.logs / "cuda_tests.log").is_file() else "")
    targets = checks(steps["scoring"], steps["paper_batch"], steps["cuda_tests"])
    machine = (steps["scoring"].get("figures", {}).get("machine")
               or steps["train_stages"].get("figures", {}).get("machine"))
    print(json.dumps({"bench": "gpu", "skipped": False, "machine": machine, "seconds": args.seconds,
                      "all_met": all(t["met"] for t in targets.values()), "targets": targets, "steps": steps,
                      "logs": str(args.logs)}))


if __name__ == "__main__":
    main()
