"""The CMA-CLIP paper's experiments on real products (Tables 2, 5, 6 and Figure 2), one fixed protocol.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/paper.py                 # CPU protocol, random-init CLIP
    HF_HUB_OFFLINE=1 .venv/bin/python bench/paper.py --pretrained ViT-B-32.pt   # the paper's setting

Writes bench/results/paper.md, paper.json and attention/*.png, logs an MLflow run (experiment
cmaclip-paper), and prints one JSON line with every figure last. The protocol is the `paper` package's;
`cmaclip-paper` (`python -m paper`) runs the same.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The repo root ahead of bench/: `paper` is the package, not bench/paper.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import report  # noqa: E402
from paper.options import from_command_line  # noqa: E402
from paper.protocol import run_and_report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    report("paper", run_and_report(from_command_line(argv, ".venv/bin/python bench/paper.py",
                                                     __doc__.splitlines()[0])))


if __name__ == "__main__":
    main()
