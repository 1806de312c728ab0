"""The gateway: a transport-independent data plane (`dataplane`) with the Open Inference
Protocol v2 over REST on top (KServe v2, with Triton's binary tensor data extension), routing
from the table the control plane publishes (`routes`). It imports neither kopf nor the control
plane, and of the workers' package only what crosses the wire (`modelloader_workers.wire`)."""
