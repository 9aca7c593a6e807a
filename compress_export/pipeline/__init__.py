"""Layer 7, pipeline and public API: one CompressionConfig resolved into a plan and driven over a model
(compress), plus convert, evaluate, distributed glue and the built-in example model.
"""
