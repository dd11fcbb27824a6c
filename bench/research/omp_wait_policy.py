"""Wall time of 10 resnet20 training steps (batch 32), under each OpenMP wait policy (needs torch).

Backs docs/training.md, "``svertka train``" (why the CLI sets ``OMP_WAIT_POLICY=PASSIVE``) and
that default in ``export/cli.py``. Run it with and without ``OMP_WAIT_POLICY=PASSIVE`` (and with
``OMP_NUM_THREADS=1``) while the machine is busy: ``.venv/bin/python -m bench.research.omp_wait_policy``.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.research.omp_wait_policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    import torch  # after the arguments: --help answers without loading torch

    from export.models import build_model

    model = build_model("resnet20", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(10):
        step()
    print(
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')} threads={torch.get_num_threads()}: "
        f"wall {time.perf_counter() - t0:.2f} s, cpu {time.process_time() - c0:.2f} s"
    )


if __name__ == "__main__":
    main()
