"""Model files fetched by the node that runs the model, into that node's own cache.

The control plane hands a worker a `SourceRequest` (the URI, an optional sha256 pin, the
credentials of the LoadedModel's Secret) and the admin's `SourcePolicy`; the worker fetches in
a short-lived process of its own (`fetch_process`), so the credentials and the storage
libraries never enter a process that parses a model, into a content-addressed cache shared by
the node's workers (`node_cache`). One adapter per outside system: `file_source`,
`http_source`, `s3_source` (obstore), `gcs_source` (google-cloud-storage), `oci_source` (the OCI
distribution API over the guarded HTTP opener).
"""

from modelloader_workers.fetching.request import (
    FetchedModel,
    SourceError,
    SourcePolicy,
    SourceRequest,
)

__all__ = ["FetchedModel", "SourceError", "SourcePolicy", "SourceRequest"]
