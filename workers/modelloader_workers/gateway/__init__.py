"""The gateway: a transport-independent data plane with a thin Open Inference Protocol v2 REST
layer on top (KServe v2, with Triton's binary tensor data extension)."""
