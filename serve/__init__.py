"""Online inference on Ray Serve: `serve.app` holds the deployments and the HTTP API."""
