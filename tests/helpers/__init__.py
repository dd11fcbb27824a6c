"""What several test folders share (servers in subprocesses come from ``bench.target.ServerProcess``)."""

from pathlib import Path

#: The repository's root.
ROOT = Path(__file__).resolve().parents[2]
