"""illume-rt: export-optimized inference runtime for ILLUME+.

Sub-packages: ``illume_rt.export`` (build time, torch), ``illume_rt.runtime`` (numpy + onnxruntime),
``illume_rt.engines`` (backends), ``illume_rt.calibration``, ``illume_rt.bench``.
"""

__version__ = "0.1.0"
