"""Layer 2, math: pure tensor functions (round-to-nearest, the Hessian core shared by GPTQ and SparseGPT, the
GPTQ/OBS sweep, scale search). Tensors in, tensors out: no hooks, no models, no files.
"""
