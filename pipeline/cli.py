"""The `cmaclip` command line. Thin by design: each command parses its flags and calls one pipeline
function; the result (JSON) goes to stdout, errors to stderr with exit code 2.

To add a command, write `_<name>_args(parser)` and `_<name>(args)` and add them to COMMANDS.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], Any]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _make_catalog_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, required=True, help="number of (good) products")
    p.add_argument("--out", required=True, help="output Parquet URI (local path, s3://, memory://)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-bad-rows", action="store_true", help="add one row of each bad kind")
    p.add_argument("--image-size", type=int, default=64)


def _make_catalog(args: argparse.Namespace) -> Any:
    from .synthetic import make_catalog
    return make_catalog(args.rows, args.out, seed=args.seed, with_bad_rows=args.with_bad_rows,
                        image_size=args.image_size)


def _image_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", action="append", dest="image_roots", metavar="URI",
                   help="a folder or bucket prefix image_uri rows may read besides the catalog's own folder "
                        "(repeatable; default: $CMACLIP_IMAGE_ROOTS; see docs/security.md)")
    p.add_argument("--image-host", action="append", dest="image_hosts", metavar="HOST[:PORT]",
                   help="an http(s) host image_uri rows may fetch from (repeatable; default: "
                        "$CMACLIP_IMAGE_HOSTS, else none)")


def _ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", required=True, help="catalog Parquet: file, folder or glob; any URI")
    p.add_argument("--tasks", required=True, help="comma-separated label columns, e.g. color,pattern,style")
    p.add_argument("--out", required=True, help="output folder URI")
    p.add_argument("--min-class-count", type=int, default=5,
                   help="labels with fewer kept rows become missing (masked) for their task")
    p.add_argument("--splits", type=_floats, default=(0.8, 0.1, 0.1), help="train,validation,test fractions")
    p.add_argument("--label-map", help="JSON file: {task: {synonym: label}}")
    p.add_argument("--workers", type=int, default=None,
                   help="processes, this one included: each takes the next group of the catalog's row groups to "
                        "stage, then the next dataset part to write (default: one per core, at most 8, for 5000+ "
                        "rows; else 1)")
    p.add_argument("--groups", type=int, default=None,
                   help="groups the row pass is cut into (default: groups of a few thousand rows, at least four "
                        "per process: pipeline.ingest.dataset.auto_groups)")
    p.add_argument("--staging", help="where groups are staged (default: a temporary folder); given, a rerun "
                                     "skips the groups already committed there")
    _image_source_args(p)


def _ingest(args: argparse.Namespace) -> Any:
    from .ingest.dataset import ingest
    from .io import storage
    label_map = storage.read_json(args.label_map) if args.label_map else None
    manifest = ingest(args.catalog, args.tasks, args.out, splits=args.splits,
                      min_class_count=args.min_class_count, label_map=label_map, workers=args.workers,
                      groups=args.groups, staging=args.staging, image_roots=args.image_roots,
                      image_hosts=args.image_hosts)
    return {"out": args.out, "input_fingerprint": manifest["input"]["fingerprint"], **manifest["counts"]}


# --- training and the model registry (pipeline.training.trainer, pipeline.tracking.registry) -----------
# Human output (epoch lines, tables) by default; --json prints the result as JSON on stdout instead,
# with the epoch lines on stderr.

def _epochs(text: str) -> int | dict[str, int]:
    """`3` (every stage) or `warmup=2,tuning=1`."""
    if "=" not in text:
        return int(text)
    return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(","))}


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="config name in cmaclip/configs/ or a JSON file")
    p.add_argument("--data", required=True, help="ingested dataset URI (the folder with manifest.json)")
    p.add_argument("--out", required=True, help="training folder URI (checkpoints; s3:// works)")
    p.add_argument("--stages", help="comma-separated, in order, from align,warmup,end_to_end,tuning (default: the "
                   "config's: align when it has epochs, then warmup,end_to_end,tuning)")
    p.add_argument("--epochs", type=_epochs, help="epochs for every stage (3) or per stage (align=2,warmup=1)")
    p.add_argument("--model-name", default="cmaclip", help="registered model name")
    p.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _train(args: argparse.Namespace) -> Any:
    from .training.trainer import train
    stream = sys.stderr if args.json else sys.stdout
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    result = train(args.config, args.data, args.out, stages=stages,
                   epochs=args.epochs, model_name=args.model_name, register=not args.no_register,
                   device=args.device, print_fn=lambda line: print(line, file=stream, flush=True))
    return result if args.json else None


REGISTRY_ACTIONS = {
    "list": "versions, aliases and verdicts",
    "compare": "champion vs challenger on the test split",
    "promote": "move champion to the challenger if the gate passes",
    "rollback": "make previous_champion the champion again",
}


def _registry_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    for action, help_text in REGISTRY_ACTIONS.items():
        a = sub.add_parser(action, help=help_text, description=help_text)
        a.add_argument("--name", default="cmaclip", help="registered model name")
        a.add_argument("--json", action="store_true", help="print the result as JSON")
        if action in ("compare", "promote"):
            a.add_argument("--tolerance", type=float, default=0.01, help="per task and metric, absolute")
        if action == "compare":
            a.add_argument("--data", help="ingested dataset URI whose test split is used (default: the "
                                          "dataset the challenger was trained on)")
        if action == "promote":
            source = a.add_mutually_exclusive_group()
            source.add_argument("--data", help="compare on this dataset's test split first (default: compare on "
                                               "the challenger's own dataset)")
            source.add_argument("--comparison", help="run id of a recorded comparison (registry compare)")
            a.add_argument("--force", action="store_true", help="promote even if the gate fails")


def _registry(args: argparse.Namespace) -> Any:
    from .tracking import registry
    if args.action == "list":
        rows = registry.list_versions(args.name)
        return rows if args.json else print(registry.format_versions(rows))
    if args.action == "rollback":
        done = registry.rollback(args.name)
        return done if args.json else print(f"{args.name}: champion is v{done['champion']} again "
                                            f"(rolled back from v{done['rolled_back_from']})")
    if args.action == "compare" or not args.comparison:
        comparison = registry.compare(args.name, args.data, tolerance=args.tolerance)
        if args.action == "compare":
            return comparison.as_dict() if args.json else print(comparison.table)
    else:
        comparison = registry.load_comparison(args.comparison)
    decision = registry.promote(args.name, comparison, tolerance=args.tolerance, force=args.force)
    if args.json:
        return decision
    print(comparison.table)
    print(("promoted: " if decision["promoted"] else "not promoted: ") + decision["reason"])
    return None


# --- scoring (pipeline.scoring) --------------------------------------------------------------------

def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", required=True, help="catalog Parquet: file, folder or glob; any URI")
    p.add_argument("--model", required=True, help="checkpoint folder (models:/name@alias with the registry)")
    p.add_argument("--out", required=True, help="scoring output root URI")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--shard", help="score this shard id only (no finalize)")
    which.add_argument("--all", action="store_true", help="score every shard, then finalize")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding DataLoader processes (0: in turn; default: auto, see docs/benchmarks.md)")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 where the hardware has it, fp16 on GPUs without it, int8 weights on x86 "
                        "CPUs without bf16, else fp32), fp32, bf16, fp16 (GPU only) or int8 (x86 CPU only); "
                        "checked by cmaclip.precision")
    p.add_argument("--device", default="auto", help="auto (cuda where available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--run-id", help="default: derived from the input snapshot and the model version")
    p.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    p.add_argument("--explain", action="store_true",
                   help="add <task>_title_contribution and <task>_image_contribution (3 forward passes; "
                        "docs/model.md)")
    p.add_argument("--full", action="store_true",
                   help="score every row (default: a product whose title, image and model are those of its "
                        "published prediction carries it over)")
    _image_source_args(p)


def _score(args: argparse.Namespace) -> Any:
    from cmaclip.precision import check_precision, resolve_device

    from .scoring.distributor import score
    check_precision(args.precision, inference=True)  # before planning writes anything under --out
    device = resolve_device(args.device)
    return score(args.catalog, args.model, args.out, shard=args.shard, all=args.all,
                 rows_per_shard=args.rows_per_shard, batch_size=args.batch_size, workers=args.workers,
                 precision=args.precision, device=device, compile=args.compile, run_id=args.run_id,
                 threads=args.threads, image_roots=args.image_roots, image_hosts=args.image_hosts,
                 explain=args.explain, full=args.full)


def _publish_args(p: argparse.ArgumentParser) -> None:
    from .scoring.gate import Limits

    p.add_argument("--out", required=True, help="scoring output root URI")
    p.add_argument("--catalog", help="also write the catalog joined with the predictions, and the report's "
                   "fill and disagreements against it")
    p.add_argument("--run-id", help="the finalized run to publish (default: the newest)")
    p.add_argument("--force", action="store_true", help="publish even if the quality gate fails")
    p.add_argument("--keep", type=int, help="published versions to keep (default: $CMACLIP_PUBLISH_KEEP, else 7)")
    p.add_argument("--rollback", action="store_true",
                   help="make the version before the current one current again (nothing else is done)")
    for name, default in Limits().to_dict().items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=default,
                       help=f"quality gate: {Limits.meanings()[name]} (default {default:g})".replace("%", "%%"))


def _publish(args: argparse.Namespace) -> Any:
    from .scoring import versions
    from .scoring.gate import Limits
    from .scoring.publish import publish

    if args.rollback:
        return versions.rollback(args.out)
    return publish(args.out, catalog=args.catalog, run_id=args.run_id, limits=Limits.from_mapping(vars(args)),
                   force=args.force, keep=args.keep)


COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {
    "make-catalog": ("write a synthetic product catalog", _make_catalog_args, _make_catalog),
    "ingest": ("validate a catalog into a dataset + quarantine + manifest", _ingest_args, _ingest),
    # training and the model registry
    "train": ("train the stages over a dataset, logged to MLflow, then register", _train_args, _train),
    "registry": ("the model registry: list | compare | promote | rollback", _registry_args, _registry),
    # scoring
    "score": ("score a catalog in shards (resumable), then finalize the run", _score_args, _score),
    "publish": ("publish the newest finalized run as a new version, past the quality gate (or roll back)",
                _publish_args, _publish),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmaclip", description="CMA-CLIP batch pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError) as exc:  # a bad catalog's CatalogError is a ValueError
        print(f"cmaclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
