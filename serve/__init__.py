"""`serve run serve/config.yaml` from the repository root: serve.app re-exports facedist.serving."""
