"""Candidate gallery embeddings on people never seen in training (facedist.gallery.evaluate):
rank-1, TAR at 1% FAR, the training threshold's FAR on held-out people, open-set identification,
a DET plot. Evidence for which embedding `facedist train --task embedding` ships.

    .venv/bin/python scripts/embedding_report.py --data TABLE --gallery neutral --out docs/results/embedding/london

TABLE: the default extraction (`facedist extract`) of a set with subject and expression labels.
Writes results.json, table.md and det.png into --out.
"""

from __future__ import annotations

import argparse

from facedist.gallery.evaluate import EvaluateConfig, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gallery", default="neutral", help="expression label of the gallery photo (Yale: normal)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    results = evaluate(EvaluateConfig(data=args.data, out=args.out, gallery=args.gallery, folds=args.folds,
                                      seeds=args.seeds))
    print(open(f"{args.out}/table.md").read())
    print(f"written to {args.out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
