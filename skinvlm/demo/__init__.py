"""What is not a pipeline stage: the offline demo, the tiny Qwen2.5-VL, synthetic photos and a local
OpenAI-protocol server. Tests, benchmarks and `skinvlm demo` use them; none needs the network.
"""
