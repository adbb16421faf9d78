"""What the sidecar and the engine processes agree on: the wire protocol and its codec, the
chunk keys (prefix-chain hashes and namespaces) and the chunk checksum. Imported by both
sides; imports neither."""
