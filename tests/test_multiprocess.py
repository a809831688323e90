"""Several processes (jax.distributed on localhost, CPU) compress one model together: the output
equals a one-process run (each process on one device, or on a mesh of its own devices), only
process 0 writes, a crashed process fails the run, a rerun resumes."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import fake_devices_env

from awp_jax import assets, checkpoints, packed
from awp_jax.export import save_hf_dir
from awp_jax.models import Llama, random_weights
from tests.test_pipeline import SMALL


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp")
    cfg = dataclasses.replace(SMALL, num_layers=4)
    tok = checkpoints.load_tokenizer(assets.fetch(assets.DEFAULT_MODEL))
    save_hf_dir(Llama(cfg, random_weights(cfg, 21)), d / "model", tokenizer=tok)
    words = "the of and a in to is was for on as with by he at from his an were are which this".split()
    rng = np.random.default_rng(1)
    (d / "text.txt").write_text("\n\n".join(" ".join(rng.choice(words, 300)) for _ in range(20)))
    return d


def _cmd(d, out, iters, extra=()):
    return [sys.executable, "-m", "awp_jax.cli", "compress", "--model", str(d / "model"), "--calib", str(d / "text.txt"),
            "--nsamples", "4", "--seqlen", "64", "--eval-windows", "0", "--max-iter", str(iters), "--tol", "0",
            "--out", str(out), *extra]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices=1):
    return fake_devices_env(devices) if devices > 1 else {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _launch(d, out, iters, n=2, heartbeat=100, extra=(), devices=1):
    port = _free_port()
    env = _env(devices)
    return [subprocess.Popen(_cmd(d, out, iters, ["--num-processes", str(n), "--process-id", str(i),
                                                  "--coordinator", f"localhost:{port}", "--heartbeat-timeout", str(heartbeat),
                                                  *extra]),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


@pytest.mark.parametrize(("stream", "devices"), [(False, 2), (True, 1)], ids=["in-memory, a 2-device mesh each", "streamed"])
def test_two_processes_equal_one_and_only_process_0_writes(setup, tmp_path, stream, devices):
    """Each process on a mesh of its own 2 devices (--mesh model=2): the output equals one process on
    that mesh. Streamed (--stream), each process reads the blocks from disk and only process 0 keeps
    the compressed ones in the run directory: the output equals the one-process in-memory run's."""
    mesh = ["--mesh", "model=2"] if devices > 1 else []
    r = subprocess.run(_cmd(setup, tmp_path / "one", 40, mesh), env=_env(devices), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    procs = _launch(setup, tmp_path / "two", 40, extra=(["--stream"] if stream else []) + mesh, devices=devices)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert (tmp_path / "two" / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()
    # the lossless compressed/ form too (one process writes it in parts; with several, process 0 through a helper process)
    (m1, p1, e1), (m2, p2, e2) = (packed.load_orbax(tmp_path / n / "compressed") for n in ("one", "two"))
    assert m1["layers"] == m2["layers"] and m1["params"] == m2["params"] and set(e1) == set(e2) and e1
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert all(np.array_equal(e1[k][f], e2[k][f]) for k in e1 for f in e1[k] if f != "meta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no run dir left, nothing else written
    assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]
    executor = json.loads((tmp_path / "two" / "awp_report.json").read_text())["executor"]
    assert executor == ("2 processes, each on a mesh 1 (stack) x 2 (model) of 2 cpu devices" if devices > 1 else "2 processes"), executor


def test_a_crashed_process_fails_the_run_and_a_rerun_resumes(setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    iters = 1000  # a block takes seconds, so the kill lands while later blocks are being solved
    subprocess.run(_cmd(setup, tmp_path / "ref", iters), check=True, env=env, capture_output=True)
    out = tmp_path / "out"
    run_dir = tmp_path / ".out.run"
    procs = _launch(setup, out, iters, heartbeat=10)
    deadline = time.time() + 300
    while not (run_dir / "block_0000.safetensors").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=180)
    procs[1].wait()
    assert procs[0].returncode != 0  # the survivor does not hang and does not write an output
    assert not out.exists() and (run_dir / "block_0000.safetensors").exists()
    procs = _launch(setup, out, iters)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert "resuming" in outs[0][1]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_several_processes_take_a_mesh_of_their_own_devices_only(monkeypatch):
    """execution.choose wraps the mesh executor in MultiProcess, and refuses a mesh holding another
    process's devices (a mesh spanning processes is not built), naming those processes."""
    import types

    import jax

    from awp_jax import execution

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert isinstance(execution.choose().inner, execution.Local) and execution.choose().name == "2 processes"
    foreign = types.SimpleNamespace(devices=np.array([jax.devices()[0], types.SimpleNamespace(process_index=1)], object))
    with pytest.raises(ValueError, match=r"holds devices of processes \[1\].*spans its own devices"):
        execution.choose(foreign)
