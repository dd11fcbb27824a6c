"""bench.research.native: perf's report is read right, and onnxruntime's spin-waiting is found by its instruction."""

from __future__ import annotations

import struct

import pytest

from bench.research import native

# The head of a real ``perf report -n --no-children --sort dso,sym --stdio -g none`` of a served model, trimmed.
REPORT = """\
# Total Lost Samples: 0
#
# Samples: 9K of event 'cpu-clock:pppH'
# Event count (approx.): 2000000000
#
# Overhead       Samples  Shared Object                                               Symbol
# ........  ............  ..........................................................  ......
#
    60.00%           600  onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so  [.] 0x0000000000001102
    20.00%           200  onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so  [.] 0x0000000000001103
    10.00%           100  _jpeg.cpython-311-x86_64-linux-gnu.so                       [.] decode_mcu_DC_first
     5.00%            50  libpython3.11.so.1.0                                        [.] _PyEval_EvalFrameDefault
     3.00%            30  [kernel.kallsyms]                                           [k] finish_task_switch.isra.0
     2.00%            20  libc.so.6                                                   [.] operator new(unsigned long)
"""


def _elf(path, code: bytes, vaddr: int = 0x1000) -> None:
    """A minimal 64-bit little-endian ELF file: its header, one PT_LOAD segment mapping the file at ``vaddr``."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    body = bytes(header) + struct.pack("<IIQQQQQQ", 1, 5, 0, vaddr, vaddr, 0x200, 0x200, 0x1000)
    body += bytes(0x100 - len(body)) + code
    path.write_bytes(body + bytes(0x200 - len(body)))


def test_the_report_gives_each_row_its_share_of_the_samples():
    total, rows = native.parse_report(REPORT)
    assert total == 2_000_000_000
    assert len(rows) == 6 and sum(share for share, _, _ in rows) == pytest.approx(1.0)
    assert rows[-1] == (0.02, "libc.so.6", "operator new(unsigned long)")


def test_cpu_per_image_is_split_by_library_and_spin_waiting_is_found_after_pause(tmp_path):
    library = tmp_path / "libort.so"
    _elf(library, b"\xf3\x90\x5b\x5d")  # pause; pop rbx; pop rbp -- at 0x1100 in the address space
    assert native.follows_pause(library, [0x1102, 0x1103, 0x1100, 0x9999]) == {0x1102}
    ms = native.breakdown(REPORT, images=100, onnxruntime_library=library)
    # 2 s of CPU over 100 images: 20 ms per image, 80 % of it onnxruntime's, a quarter of that (0x1102) spinning.
    assert ms["total"] == pytest.approx(20.0)
    assert ms["onnxruntime"] == pytest.approx(16.0) and ms[native.SPIN_LABEL] == pytest.approx(12.0)
    assert ms["JPEG decoding (simplejpeg, libjpeg-turbo)"] == pytest.approx(2.0)
    assert ms["Python interpreter"] == pytest.approx(1.0) and ms["Linux kernel"] == pytest.approx(0.6)
    assert ms["C/C++ runtime (memcpy, malloc, ...)"] == pytest.approx(0.4) and ms["other"] == 0.0


def test_a_file_that_is_not_elf_is_refused(tmp_path):
    (tmp_path / "x.so").write_bytes(b"MZ" + bytes(100))
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF file"):
        native.load_segments(tmp_path / "x.so")


def test_a_report_without_samples_is_an_error():
    with pytest.raises(ValueError, match="no event count"):
        native.parse_report("# Samples: 0\n")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(native.available() is not None, reason=str(native.available()))
def test_both_measurements_run_end_to_end_on_a_real_server(tmp_path, capsys):
    from tests.helpers.tinymodel import make_tiny_model

    path = tmp_path / "tiny" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    make_tiny_model(path)
    args = [
        "--model-path",
        str(path),
        "--name",
        "tiny",
        "--api",
        "tensor",
        "--concurrency",
        "2",
        "--seconds",
        "1",
    ]
    assert native.main(args) == 0
    out = capsys.readouterr().out
    for title in ("served (tensor API, concurrency 2)", "in-process (tensor API, concurrency 2)"):
        line = next(line for line in out.splitlines() if line.startswith(title))
        assert "img/s" in line and "mean batch" in line
    assert "gRPC core" in out  # the served server's frontend shows up; the in-process run has none
