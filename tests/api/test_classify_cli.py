"""``svertka classify``: a table per image, one error line per failure, non-zero exit on any failure."""

from __future__ import annotations

import logging

import numpy as np

from service.cli import main
from service.logs import ACCESS_LOGGER
from tests.api import images


def test_prints_a_table_per_image(make_server, tmp_path, capsys):
    srv = make_server()
    paths = []
    for i, data in enumerate([images.png(1), images.jpeg(2)]):
        path = tmp_path / f"img{i}.bin"
        path.write_bytes(data)
        paths.append(path)
    code = main(["classify", "--server", srv.address, "--top-k", "3", *map(str, paths)])
    out = capsys.readouterr().out
    assert code == 0
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    for path, block in zip(paths, blocks, strict=True):
        lines = block.splitlines()
        assert lines[0].startswith(f"{path}  (tiny v1, server ")
        assert lines[1].split() == ["rank", "label", "index", "score"]
        rows = [line.split() for line in lines[2:]]
        assert [r[0] for r in rows] == ["1", "2", "3"]
        scores = [float(r[3]) for r in rows]
        assert scores == sorted(scores, reverse=True)
        tensor = images.preprocess(srv.config.model_repository, "tiny", 1, path.read_bytes())
        expected = images.offline_logits(srv.config.model_repository, "tiny", 1, tensor[None])[0]
        assert int(rows[0][2]) == int(np.argmax(expected))
        assert rows[0][1] == f"class{int(np.argmax(expected))}"


def test_errors_are_one_line_each_and_exit_non_zero(make_server, tmp_path, capsys):
    srv = make_server()
    good = tmp_path / "good.png"
    good.write_bytes(images.png(1))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    code = main(["classify", "--server", srv.address, str(bad), str(tmp_path / "missing.png"), str(good)])
    captured = capsys.readouterr()
    assert code == 1
    err = captured.err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"svertka classify: error: {bad}: INVALID_ARGUMENT: not an image")
    assert err[1].startswith(f"svertka classify: error: {tmp_path / 'missing.png'}: ")
    assert captured.out.startswith(f"{good}  (tiny v1")

    code = main(["classify", "--server", srv.address, "--model", "nope", str(good)])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        f"svertka classify: error: {good}: NOT_FOUND: model 'nope' is not in the repository (models: tiny)"
    )


def test_every_request_has_an_id_of_its_own_in_the_access_log(make_server, tmp_path, capsys, caplog):
    srv = make_server()
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(images.png(i))
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOGGER)
    for _ in range(2):  # two runs of the command, two images each
        assert main(["classify", "--server", srv.address, *map(str, paths)]) == 0
    ids = [r.request_id for r in caplog.records if r.name == ACCESS_LOGGER and r.api == "image"]
    assert len(ids) == 4 and len(set(ids)) == 4 and all(ids), ids
