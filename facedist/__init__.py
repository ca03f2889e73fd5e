"""facedist."""
