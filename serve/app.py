from facedist.serving.app import build_app, run_server  # noqa: F401  (serve run serve.app:build_app; serve/config.yaml)
