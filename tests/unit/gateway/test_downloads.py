"""Signed download URLs: what a signature covers, expiry, and which paths may ever be served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinkerkube_gateway.errors import Forbidden
from tinkerkube_gateway.services.downloads import UrlSigner, _list_files, _plain_file


def test_a_signature_covers_what_it_names_and_its_expiry() -> None:
    signer = UrlSigner(b"k" * 32)
    sig = signer.signature("file\nt\ntinker://r/external_weights/n\n1.0\na.json", 2000)
    signer.verify("file\nt\ntinker://r/external_weights/n\n1.0\na.json", 2000, sig, now=1999)
    for resource, expires in (("file\nt\ntinker://r/external_weights/n\n1.0\nb.json", 2000),
                              ("file\nu\ntinker://r/external_weights/n\n1.0\na.json", 2000),
                              ("file\nt\ntinker://r/external_weights/n\n1.0\na.json", 2001)):
        with pytest.raises(Forbidden, match="signature"):
            signer.verify(resource, expires, sig, now=0)
    with pytest.raises(Forbidden, match="expired"):
        signer.verify("file\nt\ntinker://r/external_weights/n\n1.0\na.json", 2000, sig, now=2001)
    with pytest.raises(Forbidden, match="signature"):
        UrlSigner(b"x" * 32).verify("file\nt\ntinker://r/external_weights/n\n1.0\na.json", 2000, sig, now=0)


def test_only_plain_files_inside_the_checkpoint_are_ever_served(tmp_path: Path) -> None:
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    (export / "a.json").write_text("{}")
    (export / "sub" / "b.bin").write_bytes(b"1")
    (export / ".hidden").write_text("x")
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", export / "link")
    os.symlink(tmp_path, export / "dirlink")
    assert _list_files(export) == ["a.json", "sub/b.bin"]
    assert _plain_file(export, "sub/b.bin")
    for bad in ("../secret", "link", "dirlink/secret", ".hidden", "sub/../a.json", "", "sub", "sub//b.bin", "/a"):
        assert not _plain_file(export, bad), bad
    assert _list_files(tmp_path / "missing") == []
