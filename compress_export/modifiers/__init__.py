"""Layer 6, modifiers: steps around a pass with a lifecycle (before the pass, after each layer, at export),
such as SmoothQuant and the low-rank correction.
"""
