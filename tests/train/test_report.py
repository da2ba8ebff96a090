"""`unipeft report RUN_DIR` on a real tiny run: a valid PNG with one panel per quantity; bad input: one line, exit 2."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from unipeft.cli import main

from ._helpers import write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished run of the built-in mlp on digits, trained through `unipeft train` (30 steps, 3 evaluations)."""
    root = tmp_path_factory.mktemp("report")
    config = write_config(root / "c.yaml", model="mlp", data={"source": "digits"}, output_dir=str(root / "run"),
                          method={"name": "lora", "r": 4, "alpha": 8, "target_modules": ["fc1", "fc2"]},
                          optimizer={"lr": 1e-2}, max_steps=30, batch_size=32, log_every=5, eval_every=10,
                          threads=1)
    assert main(["train", str(config), "--quiet"]) == 0
    return root / "run"


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_png(path, panels: int):
    """A real PNG: magic bytes, not trivially small, read back by matplotlib at the size the layout implies."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)
    cols = 2 if panels in (2, 4) else min(3, panels)
    rows = -(-panels // cols)
    assert (width, height) == (500 * cols, round(100 * (3.4 * rows + 0.6)))  # figsize x dpi 100
    rgb = (image[..., :3] * 255).round().astype(int)
    # The lines themselves are drawn: pixels of the train colour (C0) and the valid colour (C1).
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(rgb - colour).sum(-1) <= 6).sum() > 50, colour
    return image


def test_report_draws_every_quantity_of_a_real_run(digits_run, capsys):
    records = _records(digits_run)
    # What the trainer logged: train records every 5 steps, valid every 10, one test record at the end.
    assert sum("split" not in r for r in records) == 6 and sum(r.get("split") == "valid" for r in records) == 3
    assert records[-1]["split"] == "test" and {"loss", "lr", "grad_norm"} <= set(records[0])
    assert main(["report", str(digits_run)]) == 0
    out = digits_run / "report.png"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    # loss (train + valid + test), lr, grad_norm, accuracy, macro_f1
    _check_png(out, panels=5)


def test_report_out_path_and_a_run_in_progress(digits_run, tmp_path, capsys):
    # A run in progress: config.yaml and metrics.jsonl, no summary.json and no test record yet.
    partial = tmp_path / "run.partial"
    partial.mkdir()
    shutil.copy(digits_run / "config.yaml", partial)
    lines = (digits_run / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # two train records, one valid
    target = tmp_path / "figures" / "progress.png"
    target.parent.mkdir()
    assert main(["report", str(partial), "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {target}"
    assert sorted(p.name for p in partial.iterdir()) == ["config.yaml", "metrics.jsonl"]
    _check_png(target, panels=5)


def test_report_help_explains_the_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "RUN_DIR/report.png" in text and "--out PATH" in text and "Agg backend" in text
    assert "learning rate" in text and "exit code 2" in text


BAD_METRICS = {
    "empty": b"",
    "blank lines only": b"\n  \n",
    "not json": b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss"\n',
    "not an object": b"[1, 2]\n",
    "no integer step": b'{"loss": 0.5}\n',
    "not utf-8": b'{"step": 1, "loss": 0.5}\n\xff\xfe\n',
    "nothing numeric": b'{"step": 1, "split": "valid"}\n',
}


def _fails(argv, capsys, expect: str):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unipeft report: error: ") and expect in lines[0], lines
    assert captured.out == ""


@pytest.mark.parametrize("name", sorted(BAD_METRICS))
def test_bad_metrics_file_is_one_error_line_and_writes_nothing(name, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(BAD_METRICS[name])
    expect = {"empty": "is empty", "blank lines only": "is empty", "not json": "line 2: not a JSON object",
              "not an object": "line 1: expected a JSON object", "no integer step": "integer 'step'",
              "not utf-8": "cannot read it", "nothing numeric": "no numeric quantity"}[name]
    _fails(["report", str(tmp_path)], capsys, expect)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_missing_or_unusable_paths_are_one_error_line(digits_run, tmp_path, capsys):
    _fails(["report", str(tmp_path)], capsys, "metrics.jsonl: no such file")
    _fails(["report", str(tmp_path / "nowhere")], capsys, "is not a folder")
    (tmp_path / "live.partial").mkdir()
    (tmp_path / "live.partial" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    _fails(["report", str(tmp_path / "live")], capsys, "the run in progress logs to")
    (tmp_path / "dir" / "metrics.jsonl").mkdir(parents=True)  # a folder where the file should be
    _fails(["report", str(tmp_path / "dir")], capsys, "cannot read it")
    _fails(["report", str(digits_run), "--out", str(tmp_path / "r.svg")], capsys, "ending in .png")
    _fails(["report", str(digits_run), "--out", str(tmp_path / "no" / "r.png")], capsys, "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "live.partial"]
    assert not list(tmp_path.rglob("*.png"))
