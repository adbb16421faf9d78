"""The demo and the harness it shares with tests and benchmarks: a tiny random model, a
sidecar and vLLM engines in their own processes. Not part of the library."""
