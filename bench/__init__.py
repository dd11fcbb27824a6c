"""svertka's benchmark: the onnxruntime ceiling, svertka and a Triton peer under load, one report.

Run it with ``make bench`` (``BENCH_QUICK=1`` for a quick pass without the
peer) or ``python -m bench --help``. Nothing here is imported by the server.
``bench.report`` writes the page (``docs/benchmarks.md``); ``bench.research``
holds the measurements that the page's findings and the docs cite, which
``make bench`` does not run.
"""
