"""`cmaclip-paper` (or `python -m paper`): the paper's experiments on a catalog, one fixed protocol.

    HF_HUB_OFFLINE=1 cmaclip-paper --catalog ../shared/data/fashion-small/products.parquet
    HF_HUB_OFFLINE=1 cmaclip-paper --pretrained ViT-B-32.pt        # the paper's setting

Writes paper.md, paper.json and attention/*.png to --results-dir, logs an MLflow run (experiment
cmaclip-paper) and prints the results as JSON. `bench/paper.py` runs the same.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from .options import from_command_line


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = from_command_line(argv, "cmaclip-paper", __doc__.splitlines()[0])
    from .protocol import run_and_report  # torch and the pipeline: after the flags are checked

    try:
        results = run_and_report(opts)
    except (ValueError, FileNotFoundError) as exc:  # a bad catalog or config: a message, not a traceback
        print(f"cmaclip-paper: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
