"""Model Loader's data plane: LiteRT workers (one process per model) and the v2 gateway."""
