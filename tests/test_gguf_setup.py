"""setup-gguf without the network: the release's hash is checked before anything is unpacked, only the
converter's files are unpacked (no links, nothing outside the target), and a second unpack (another process
that got there first) leaves the first one in place."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from lora_app.adapters import gguf

ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


def fake_release(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add(ROOT + "convert_hf_to_gguf.py", b"print('converter')")
        add(ROOT + "conversion/llama.py")
        add(ROOT + "gguf-py/gguf/__init__.py")
        add(ROOT + "LICENSE")
        add(ROOT + "src/llama.cpp")  # not the converter's: left out
        add(ROOT + "conversion/evil.py", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add(ROOT + "conversion/../../escape.py")
    return path


def test_unpack_takes_only_the_converters_files(tmp_path: Path) -> None:
    release = fake_release(tmp_path / "release.tar.gz")
    target = tmp_path / "home" / "llama.cpp" / "x"
    gguf.unpack(release, target)
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file() or p.is_symlink())
    assert files == ["LICENSE", "conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    gguf.unpack(release, target)  # a second process that lost the race: no error, the first copy stays
    assert (target / "convert_hf_to_gguf.py").read_text() == "print('converter')"
    assert not list(target.parent.glob(".unpacking-*"))


def test_setup_refuses_a_release_with_another_hash(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORA_APP_HOME", str(tmp_path / "home"))

    def fake_pip(args: list[str]) -> None:
        fake_release(Path(args[args.index("-d") + 1]) / "llama_cpp_python-0.3.36.tar.gz")

    monkeypatch.setattr(gguf, "pip", fake_pip)
    with pytest.raises(gguf.GGUFError, match="sha256 .* expected 832db069"):
        gguf.setup(log=lambda _m: None)
    assert not gguf.converter_dir().exists()
    assert "setup-gguf" in gguf.setup_problem()
