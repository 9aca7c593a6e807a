"""Layer 1, core: the vocabulary every other layer speaks (errors, registries, the Scheme, the in-memory
result of a pass, model structure as data, sparsity patterns, hardware facts, settings, progress).
Imports nothing of ours above it.
"""
