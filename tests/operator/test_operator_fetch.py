"""The model-fetch init container's command, on file:// (the other schemes need their SDKs and a network)."""

from __future__ import annotations

import pathlib

from pagedserve.operator import fetch


def test_file_uri_copies_once(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00" * 7)
    dest = tmp_path / "models" / "model"
    assert fetch.main([f"file://{src}", str(dest)]) == 0
    assert (dest / "config.json").read_text() == "{}" and (dest / "sub" / "w.bin").read_bytes() == b"\x00" * 7
    assert (dest / fetch.MARKER).read_text() == f"file://{src}"
    (src / "config.json").write_text('{"changed": 1}')
    assert fetch.main([f"file://{src}", str(dest)]) == 0  # already fetched: left alone
    assert (dest / "config.json").read_text() == "{}"


def test_unknown_scheme_fails_with_a_message(tmp_path: pathlib.Path, capsys) -> None:
    assert fetch.main(["ftp://host/model", str(tmp_path / "m")]) == 2
    assert "unsupported model URI" in capsys.readouterr().err
