"""The embedding arithmetic settings, kept free of torch so configs and the CLI can check them cheaply.

`model.embedder.resolve_precision` turns a setting into the arithmetic a device runs ("fp32" or "bf16").
"""

PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where the CPU (AVX512-BF16/AMX) or GPU has it natively
