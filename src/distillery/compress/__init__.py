"""Compression of a student to the size and numeric format it ships in (docs/compression.md):
``prune`` (depth and width), ``lowrank`` (truncated SVD, activation-aware), ``quantize`` (torchao
PTQ and QAT convert, torch.ao dynamic int8) and ``gguf_export`` (llama.cpp files). Import the
submodules directly; nothing heavy is imported here."""
