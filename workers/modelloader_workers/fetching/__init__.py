"""Model files fetched by the node that runs the model, into that node's own cache.

The control plane hands a worker a `SourceRequest` (the URI, an optional sha256 pin, the
credentials of the LoadedModel's Secret) and the admin's `SourcePolicy`; object-store sources
(s3, gs, oci) are fetched in a short-lived process of its own (`fetch_process`): the storage
libraries never load into a process that parses models, the credentials only pass through the
worker (of the same origin) as the load's argument, and every connection the clients make goes
through the address guard (`egress_proxy`). Files and http(s) are fetched in the worker. Either
way into a content-addressed cache shared by the node's workers (`node_cache`). One adapter per
outside system: `file_source`, `http_source`, `s3_source` (obstore), `gcs_source` (google-
cloud-storage), `oci_source` (the OCI distribution API over the guarded HTTP opener).
"""

from modelloader_workers.fetching.request import (
    FetchedModel,
    SourceError,
    SourcePolicy,
    SourceRequest,
)

__all__ = ["FetchedModel", "SourceError", "SourcePolicy", "SourceRequest"]
