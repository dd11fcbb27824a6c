"""The engine: the model repository and its versions, dynamic batching and onnxruntime.

What a frontend may use is in :mod:`service.engine.interface`; the rest is the
engine's own (``repository``, ``served_model``, ``loading``, ``batching``,
``runtime``).
"""
