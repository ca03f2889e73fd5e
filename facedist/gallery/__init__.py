"""Open-set recognition against an enrolled gallery: people the models never saw, added and
removed without retraining (issue 29).

  * embedding   what a photo's embedding is (EmbeddingModel: the inputs, an optional learned
                linear map, the verification threshold), fitted and stored as the `embedding`
                bundle (`facedist train --task embedding`); pair scores, thresholds at a FAR
  * search      GalleryIndex: exact cosine top-k over a float32 matrix, in batches
  * store       Gallery: immutable Parquet parts under a local folder or s3:// prefix, one per
                enrolment, read by listing; delete(person) rewrites the parts that hold them
  * evaluate    the split-by-person measurement of candidate embeddings (rank-1, TAR@FAR,
                open-set identification, DET plot)
  * command     `facedist gallery ...` and `facedist train --task embedding`
  * ray_enroll  bulk enrolment from a manifest or coefficients table on Ray Data
  * service     the Serve deployment behind /v1/gallery, /v1/identify and /v1/verify

No module here imports Ray at import time except ray_enroll and service.
"""
