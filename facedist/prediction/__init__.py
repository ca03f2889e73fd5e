"""Batch prediction (`facedist predict`): a coefficients table (or images, extracted first) ->
the predictions table.

  * rows         plain functions: coefficient rows -> prediction rows (the Recognizer's decisions)
  * distributed  the Ray Data adapter around them
"""
