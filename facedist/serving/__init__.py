"""Online inference on Ray Serve: FastAPI ingress -> batched extraction -> batched recognition.

  * settings     ServeSettings, the one source of every deployment option
  * schemas      request/response shapes (OpenAPI) and row -> JSON
  * errors       ApiError and the one error body
  * batching     Batcher: concurrent calls grouped greedily into one model call
  * deployments  FaceExtractor (one extractor per replica, batched; it decodes the uploads,
                 so an undecodable one never reaches a model; GPU when present) and
                 FaceRecognizer (C-Net aggregation + identity/gender/expression classifiers from
                 the training job's bundles, local or s3://)
  * ingress      FacedistAPI, the FastAPI app: auth, limits, multipart parsing, fan-out
  * app          build_app (for `serve run` / serve/config.yaml) and run_server (`facedist serve`)

API (also on /docs):
    GET  /             the web page: drop photos, see the fitted face and the predictions
    POST /v1/extract   multipart field "image"           -> coefficients, landmarks, pose
                       (?mesh=true: also the decimated fitted mesh in image pixels)
    POST /v1/predict   multipart field "images" (1..K)   -> identity top-k, gender, expressions
    GET  /v1/health, GET /v1/models
    with a gallery (gallery_uri; facedist.gallery.service):
    POST /v1/gallery/{person}  "images" -> enrol;  DELETE /v1/gallery/{person};  GET /v1/gallery
    POST /v1/identify  "images" of one person -> top-k enrolled, "unknown" below the threshold
    POST /v1/verify    "a" and "b" -> the same person or not
"""

from facedist.serving.settings import ServeSettings


def __getattr__(name: str):
    # build_app and run_server import Ray Serve and FastAPI: only when asked for, so the CLI can
    # read ServeSettings without them.
    if name in ("build_app", "run_server"):
        from facedist.serving import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServeSettings", "build_app", "run_server"]
