"""The CMA-CLIP paper's experiments on real products (Tables 2, 5, 6 and Figure 2), one fixed protocol.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/paper.py                 # CPU protocol, random-init CLIP
    HF_HUB_OFFLINE=1 .venv/bin/python bench/paper.py --pretrained ViT-B-32.pt   # the paper's setting

Writes bench/results/paper.md, paper.json and attention/*.png, logs an MLflow run (experiment
cmaclip-paper), and prints one JSON line with every figure last. `cmaclip evaluate` runs the same.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import report  # noqa: E402
from pipeline.experiments import run_and_report  # noqa: E402
from pipeline.paper_options import add_arguments, options_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python bench/paper.py", *map(shlex.quote, argv)])
    results = run_and_report(options_from_args(parser.parse_args(argv), command.strip()))
    report("paper", results)


if __name__ == "__main__":
    main()
