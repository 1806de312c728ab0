"""Model Loader's control plane: the LoadedModel resource, the reconcile core, `modelloader
local` (the embedded default) and the CLI."""

API_GROUP = "modelloader.dev"
API_VERSION = "v1alpha1"
