"""Extraction: images -> the coefficients table (Parquet parts), one row per input image.

  * config       ExtractConfig: every setting of an extraction run (the extractor it builds)
  * rows         the row functions: discover -> read -> decode -> extract (pure; both runners use them)
  * output       the output folder: parts, resume keys, set-aside parts, the summary
  * local        the single-process runner (`facedist extract` without --ray)
  * distributed  the Ray Data runner: a thin adapter around the same row functions
"""
