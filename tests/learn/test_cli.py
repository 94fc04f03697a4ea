"""``qmrkit learn train|eval``."""

import json

from qmrkit.cli import main


def test_learn_train_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "learn",
            "train",
            "--out",
            str(out),
            "--n",
            "3",
            "--n-val",
            "2",
            "--shape",
            "16",
            "16",
            "--coils",
            "2",
            "--epochs",
            "2",
            "--unrolls",
            "2",
            "--channels",
            "4",
            "--layers",
            "2",
            "--memory",
            "checkpoint",
            "--no-progress",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["history"]) == 2 and "cg_sense" in m["baselines"]
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    rc = main(
        [
            "learn",
            "eval",
            "--checkpoint",
            str(out / "best.pt"),
            "--n-val",
            "2",
            "--shape",
            "16",
            "16",
            "--coils",
            "2",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["model"]["nrmse"] > 0


def test_learn_errors_are_one_line(tmp_path, capsys):
    rc = main(["learn", "eval", "--checkpoint", str(tmp_path / "missing.pt")])
    assert rc == 2
    assert "file not found" in capsys.readouterr().err  # checked while parsing
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    rc = main(["learn", "eval", "--checkpoint", str(tmp_path / "junk.pt")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and len(err.splitlines()) == 1
    rc = main(["learn", "train", "--out", str(tmp_path), "--kind", "3d", "--shape", "16", "16"])
    assert rc == 2
    assert "--shape needs 3 numbers" in capsys.readouterr().err
