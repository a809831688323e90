import re

import pytest

from awp_jax.cli import main


def test_demo_prints_objectives_and_awp_improves(capsys):
    assert main(["demo", "--d-out", "64", "--d-in", "256", "--tokens", "2048", "--max-iter", "50"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(\w[\w ()]*?)\s{2,}\S.*?\s+([0-9.]+)\s{2}", out, re.M)}
    assert rows["awp (from wanda)"] < rows["wanda"] < rows["magnitude"]
    assert rows["awp (from rtn)"] <= rows["rtn"]


@pytest.mark.parametrize("flag, value, message", [("--bits", "9", "bits must be"), ("--sparsity", "1.5", "sparsity"), ("--group-size", "100", "does not divide")])
def test_demo_bad_flags_are_named(capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--d-out", "8", "--d-in", "256", "--tokens", "64", flag, value])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_compress_batch_size_must_be_a_positive_integer(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--batch-size", value, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "--batch-size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
