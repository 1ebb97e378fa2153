"""bench_xmax --train: a model trained here (the benchmark's one plain loop) is studied,
records how it was trained, and --merge adds it to an earlier results file."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_xmax  # noqa: E402

TINY = ["--quick", "--batch", "8", "--steps", "2", "--reference-iters", "2", "--precisions", "fp32", "fp64"]


def results_file(out: Path) -> dict:
    (path,) = out.glob("xmax-*.json")
    return json.loads(path.read_text())


def test_train_option_trains_records_and_merges(tmp_path):
    out, ckpts = tmp_path / "out", tmp_path / "ckpt"
    assert bench_xmax.main(["--init", "mlp:digits", "--out", str(out), *TINY]) == 0
    first = results_file(out)
    argv = ["--merge", "--train", "mlp:digits:erm", "mlp:digits:ater", "--train-epochs", "2", "--train-subset", "300",
            "--train-dir", str(ckpts), "--out", str(out), *TINY]
    assert bench_xmax.main(argv) == 0
    report = results_file(out)
    assert [bench_xmax.case_label(c) for c in report["cases"]] == [
        "mlp/digits/init", "mlp/digits/ERM-trained", "mlp/digits/ATER-trained"]
    assert report["cases"][0] == first["cases"][0]  # the earlier case is kept as it was
    assert [r["cases"] for r in report["runs"]] == [["mlp/digits/init"],
                                                    ["mlp/digits/ERM-trained", "mlp/digits/ATER-trained"]]
    assert report["runs"][1]["argv"] == argv
    for case, method in zip(report["cases"][1:], ("erm", "ater")):
        t = case["training"]
        assert (t["method"], t["epochs"], t["train_images"], t["test_images"]) == (method, 2, 300, 364)
        assert len(t["epoch_seconds"]) == 2 and all(s > 0 for s in t["epoch_seconds"])
        assert t["test_error"] < t["init_test_error"] - 20, t  # 6 Adam steps: clearly trained, not at init
        assert (t["train_xmax_grad_ratio"] > 0) == (method == "ater")
        assert set(case["results"]) == {"fp32", "fp64"}
        names = [r["name"] for r in case["results"]["fp64"]["methods"]]
        assert {"random", "fd xi=0.001", "hvp", "fd steps=2", "hvp steps=2", "reference"} <= set(names)
        assert all(0 < r["fraction"] <= 1.2 for r in case["results"]["fp32"]["methods"] if r["name"] != "clean")
    assert sorted(p.name for p in ckpts.iterdir()) == ["mlp-digits-ater-e2-n300-s0.pt", "mlp-digits-erm-e2-n300-s0.pt"]
    md = next(out.glob("xmax-*.md")).read_text()
    assert "Measured in 2 runs" in md and "--train mlp:digits:erm" in md
    assert "## How the cases trained here were trained" in md and "## Summary: fraction of the reference reached (fp64)" in md
    t = report["cases"][2]["training"]
    assert f"| mlp | digits | ATER-trained | {t['loop']} | 2 | 300 | {t['init_test_error']:.1f} | " in md

    # the same spec again: the kept weights are reused (nothing trained), the case replaced, not added
    assert bench_xmax.main(["--merge", "--train", "mlp:digits:ater", "--train-epochs", "2", "--train-subset", "300",
                            "--train-dir", str(ckpts), "--out", str(out), *TINY]) == 0
    again = results_file(out)
    assert [bench_xmax.case_label(c) for c in again["cases"]] == [
        "mlp/digits/init", "mlp/digits/ERM-trained", "mlp/digits/ATER-trained"]
    assert again["cases"][2]["training"]["reused_checkpoint"].endswith("mlp-digits-ater-e2-n300-s0.pt")
    assert again["cases"][2]["training"]["test_error"] == t["test_error"] and len(again["runs"]) == 3


def test_train_spec_is_checked():
    with pytest.raises(SystemExit, match="MODEL:DATASET:METHOD"):
        bench_xmax.main(["--train", "mlp:digits:vat"])


def test_markdown_of_a_file_without_runs_keeps_its_header(tmp_path):
    """A results file written before runs were recorded: one run from its top-level fields."""
    report = {"machine": "m", "date": "2026-01-01 00:00 UTC", "torch": "t", "omp_threads": "1", "cpus": 2,
              "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 2.0, 2.0], "seconds": 60.0, "cases": []}
    (run,) = bench_xmax.runs_of(report)
    assert run["argv"] is None and run["load_after"] == [2.0, 2.0, 2.0]
    assert bench_xmax.header(report)[0].startswith("2026-01-01 00:00 UTC, torch t, OMP_NUM_THREADS=1")
