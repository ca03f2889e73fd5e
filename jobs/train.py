"""Ray Train job: fit C-Net or a coefficient classifier from a coefficients table.

    python jobs/train.py --task cnet --data s3://bucket/coeffs --output s3://bucket/train --workers 2
    python jobs/train.py --task identity --data ... --output ... --cnet s3://bucket/train/cnet
    python jobs/train.py --task cnet identity expression --data ... --output ...   # in turn, one job

Same --output and --name again: continues from the latest checkpoint. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facedist.cli import add_train_arguments, cmd_train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.add_argument("--text", dest="json", action="store_false", help="one line instead of JSON")
    return cmd_train(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
