"""What crosses between the gateway, the model workers and the control plane: the data-path
framing, tensor types, signatures, addresses and identities. Pure: no Ray, no HTTP, no LiteRT,
so every side can import it and none imports another side through it."""
