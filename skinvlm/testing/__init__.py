"""Test doubles shipped with skinvlm for its tests and benchmarks (and anyone testing a pipeline built on it):
an OpenAI-protocol server on 127.0.0.1 with injected failures. Nothing in the CLI imports them."""
