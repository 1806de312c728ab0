"""The gateway's gRPC messages and services, generated from the .proto files here by
`tools/make_protos.py`. They live in a descriptor pool of their own: the protocol's names
(`inference.ModelInferRequest`, ...) are also those of Triton's and KServe's generated code,
which a process may import beside these (a client in a test, say)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
