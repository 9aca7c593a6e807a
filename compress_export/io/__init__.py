"""Layer 4, io: everything that touches a model folder or an export on disk, treating each as hostile input
(safety), reading (model_io, source, calibration, export_check, loading) and writing (writer, lowrank adapters).
Sits above formats and kernels, which it uses to read exports back.
"""
