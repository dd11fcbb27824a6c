"""The measurements behind the findings: scripts that a finding, a doc or a docstring cites, kept re-runnable.

None of this is part of ``make bench`` (``python -m bench``) or of the server.
Each module's docstring names what it backs and how to run it; by subject:

* serving, A/B and profiling: ``experiments`` (a server change against the
  current server, ABBA), ``native`` (CPU by library, Linux ``perf``),
  ``inprocess`` (a request's cost without gRPC), ``grpc_stacks`` and
  ``cpp_floor/`` (the gRPC stacks' own floor, C++ included);
* the engine: ``hop`` (the batcher's hop to its instance thread),
  ``engine_batching`` (batching policy, onnxruntime's spinning) on the
  repositories ``engine_models`` builds, ``preprocess`` and
  ``normalize_variants`` (the image pipeline), ``decode_gil`` (the GIL and
  memory of decoding, costly images);
* training and export: ``exporter_comparison``, ``omp_wait_policy``.

Run each with ``.venv/bin/python -m bench.research.NAME --help`` (those with options).
"""
