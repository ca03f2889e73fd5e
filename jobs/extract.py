"""Distributed coefficient extraction: images under a prefix (or a manifest) -> Parquet parts.

    ray job submit --working-dir . -- python jobs/extract.py \\
        --input s3://bucket/raw/ --output s3://bucket/coeffs/ --backend tddfa --actors 8

Without --address (and outside `ray job submit`, which sets RAY_ADDRESS) it starts a local Ray.
S3 credentials come from the standard chain; --endpoint (or AWS_ENDPOINT_URL) points at MinIO/Ceph.
Rerunning with the same --output skips images already extracted (path + content hash); an output
made with other settings (backend, detector, landmark source, model) is refused unless --no-resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# `python jobs/extract.py` puts jobs/ on sys.path, not the repository root that holds facedist/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facedist import SettingsError  # noqa: E402
from facedist.cli import (HelpFormatter, add_address_flag, add_extraction_arguments,  # noqa: E402
                          add_extractor_arguments, add_storage_flags, ray_extract_config_from_args, s3_options)
from facedist.extraction.distributed import run_ray_extraction  # noqa: E402


class _Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The docstring as written above; each flag's real default, as `facedist extract --help` shows."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("--input", required=True, help="folder, s3:// prefix, or CSV/Parquet manifest with labels")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix for Parquet parts")
    # The flags of `facedist extract`, declared once in facedist.cli.
    add_extractor_arguments(p)
    add_extraction_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    add_address_flag(p)
    add_storage_flags(p)
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ray_extract_config_from_args(args, progress=not args.no_progress)
    except SettingsError as exc:
        parser.error(str(exc))
    try:
        summary = run_ray_extraction(args.input, args.output, config, address=args.address, options=s3_options(args))
    except SettingsError as exc:  # an output made with other settings: say so, no traceback
        parser.error(str(exc))
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if summary["run"]["unaccounted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
