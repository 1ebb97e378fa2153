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
    assert again["runs"][1]["cases"] == ["mlp/digits/ERM-trained"]
    assert again["runs"][1]["superseded"] == ["mlp/digits/ATER-trained"]


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


def test_merge_from_keeps_each_runs_machine(tmp_path):
    """--merge-from: another file's cases and runs are added (same label: replaced), each run
    keeps its machine, and the header names both machines."""
    def case(model, state, fraction):
        methods = [{"name": n, "grad_norm": 1.0, "fraction": fraction, "cos_hvp": 0.5, "forward_equivalents": 4.0,
                    "seconds": 0.01} for n in ("random", "hvp", "reference")]
        return {"model": model, "dataset": "digits", "state": state, "eps": 2.0, "results": {"fp32": {
            "batch": 8, "eps": 2.0, "reference_iters": 2, "reference_starts": 3, "methods": methods}}}

    top = {"torch": "t", "omp_threads": "1", "cpus": 2, "load_before": [1.0] * 3, "load_after": [1.0] * 3,
           "seconds": 60.0}
    old = {**top, "machine": "Old CPU", "date": "d1", "cases": [case("mlp", "init", 0.3), case("lenet", "init", 0.4)]}
    new = {**top, "machine": "New CPU", "date": "d2", "cases": [case("lenet", "init", 0.5), case("conv-large", "init", 0.6)],
           "runs": [{"date": "d2", "torch": "t", "omp_threads": "1", "cpus": 2, "load_before": [1.0] * 3,
                     "load_after": [1.0] * 3, "seconds": 60.0, "argv": ["--init", "lenet:digits"],
                     "cases": ["lenet/digits/init", "conv-large/digits/init"]}]}
    target, source = tmp_path / "xmax-old.json", tmp_path / "xmax-new.json"
    target.write_text(json.dumps(old))
    source.write_text(json.dumps(new))
    assert bench_xmax.main(["--results", str(target), "--merge-from", str(source)]) == 0
    merged = json.loads(target.read_text())
    assert [(c["model"], c["results"]["fp32"]["methods"][0]["fraction"]) for c in merged["cases"]] == [
        ("mlp", 0.3), ("lenet", 0.5), ("conv-large", 0.6)]
    assert [r["machine"] for r in merged["runs"]] == ["Old CPU", "New CPU"]
    md = target.with_suffix(".md").read_text()
    assert md.startswith("# x_max study on Old CPU and New CPU")
    assert "* d1 on Old CPU" in md and "command not recorded" in md and "* d2 on New CPU" in md
