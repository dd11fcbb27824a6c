"""Frontend processes talking to the engine process: the control channel and the shared memory.

With ``svertka serve --frontends N`` (N > 1) each frontend process owns one
shared memory slab (:mod:`service.ipc.slab`): it writes a request's rows (an
FP32 tensor, or decoded images) into a range of it and sends the engine a
small control message naming the range (:mod:`service.ipc.framing`) over one
Unix socket connection. The engine (:mod:`service.ipc.engine_server`) reads
the rows from the slab into its batches (the batcher's one copy), and answers
with the logits inline. :mod:`service.ipc.engine_client` is the frontend's
side: an ``Engine`` (``service.engine.interface``) whose models live in the
other process. Nothing is pickled: control messages are JSON, tensors are raw
bytes in shared memory.
"""
