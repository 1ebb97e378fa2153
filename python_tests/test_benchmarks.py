"""The step benchmark runs end to end (a --quick smoke run, correctness checks
included) and judges its targets from the measured ratios; the scaling
benchmark checks each case against the reference before timing it."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_step  # noqa: E402


def row(seconds, peak=(100.0, 90.0), d=784, batch=256):
    t = dict(seconds)
    return {"model": "mlp", "in_features": d, "batch": batch, "seconds": t,
            "peak_bytes": {"naive_ater": peak[0], "ater": peak[1]}}


def test_cpu_targets_from_ratios():
    r = row({"erm": 1.0, "naive_ater": 6.0, "ater": 4.8})
    got = {t["text"].split(" =")[0]: t for t in bench_step.targets([r], "cpu")}
    assert got["ater_ext ATER step / naive eager step"]["status"] == "PASS"
    assert got["ater_ext ATER step / naive eager step"]["value"] == pytest.approx(0.8)
    assert got["ater_ext ATER step / ERM step"]["status"] == "PASS"
    assert got["ater_ext ATER peak memory / naive"]["value"] == pytest.approx(0.9)
    slow = bench_step.targets([row({"erm": 1.0, "naive_ater": 5.5, "ater": 5.5})], "cpu")
    assert [t["status"] for t in slow] == ["FAIL", "FAIL", "PASS"]
    assert "missed by 18%" in slow[0]["text"] and "missed by 10%" in slow[1]["text"]


def test_gpu_targets_use_the_captured_step_and_skip_other_rows():
    r = row({"erm": 1.0, "naive_ater": 10.0, "ater": 7.0, "ater_graph": 4.0, "ater_reduce_overhead": 6.0})
    got = bench_step.targets([row({"erm": 1.0}, batch=64), r], "cuda")
    assert [t["status"] for t in got] == ["PASS", "FAIL", "PASS"]
    assert got[0]["value"] == pytest.approx(0.4) and "missed by 20%" in got[1]["text"]
    assert bench_step.targets([row({"erm": 1.0}, batch=64)], "cuda") == []


def test_quick_step_benchmark_writes_its_report(tmp_path):
    bench_step.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    (report_file,) = tmp_path.glob("step-*-quick.json")
    report = json.loads(report_file.read_text())
    (r,) = report["rows"]
    assert set(r["seconds"]) == set(bench_step.variants("cpu"))
    assert all(v > 0 for v in r["seconds"].values())
    assert r["grad_rel_gap"] < 1e-6  # naive and ater_ext gradients agreed before timing
    md = report_file.with_suffix(".md").read_text()
    assert "| mlp 1x28x28 | 64 |" in md and report["machine"] in md


@pytest.mark.parametrize("op", ["fd_direction", "normalized_step"])
def test_scaling_case_checks_then_times(op, monkeypatch):
    import bench_scaling

    r = bench_scaling.case(op, 8, 50, "cpu", 0.01)
    assert r["op"] == op and (r["B"], r["D"]) == (8, 50) and r["seconds"] > 0 and r["GBps"] > 0
    # a wrong kernel must be caught before anything is timed
    spec = bench_scaling.SPECS[op]
    monkeypatch.setitem(bench_scaling.SPECS, op, spec.__class__(**{**spec.__dict__, "fused": lambda *a, out: out.zero_()}))
    with pytest.raises(AssertionError):
        bench_scaling.case(op, 8, 50, "cpu", 0.01)


def test_methods_targets_from_ratios():
    import bench_methods

    rows = [{"model": "mlp", "batch": 256, "seconds": {"ater": 0.5, "pgd_at": 1.0}},
            {"model": "conv-large", "batch": 16, "seconds": {"ater": 0.9, "pgd_at": 1.0}},
            {"model": "resnet18", "batch": 32, "seconds": {"ater": 2.0, "pgd_at": 1.0}}]
    got = bench_methods.targets(rows)
    assert [t["status"] for t in got] == ["PASS", "FAIL"]  # resnet18 is measured, not judged
    assert "missed by 50%" in got[1]["text"]


def test_quick_methods_benchmark_checks_and_writes(tmp_path):
    import bench_methods

    bench_methods.main(["--quick", "--out", str(tmp_path)])
    (report_path,) = tmp_path.glob("methods-*-quick.json")
    report = json.loads(report_path.read_text())
    (r,) = report["rows"]
    assert set(r["seconds"]) == set(bench_methods.METHODS)
    assert all(gap < 1e-8 for gap in r["grad_rel_gaps"].values())
    assert (tmp_path / report_path.name.replace(".json", ".md")).read_text().startswith("# Training-step cost")


def test_frontier_mean_std_is_the_sample_statistic():
    import statistics

    import frontier

    values = [72.5, 74.0, 70.5]
    assert frontier.mean_std(values) == pytest.approx({"mean": statistics.mean(values),
                                                       "std": statistics.stdev(values)})
    assert frontier.mean_std([3.0]) == {"mean": 3.0, "std": 0.0}


def test_frontier_trains_evaluates_aggregates_and_keeps_finished_runs(tmp_path):
    """A tiny frontier (digits, 2 methods x 2 seeds, 1 epoch): the table's figures are the
    mean +- std of the per-run files, and a second call trains nothing."""
    import statistics

    import frontier

    argv = ["--dataset", "digits", "--methods", "erm,fgsm-rs", "--seeds", "0,1", "--epochs", "1", "--aa-limit", "4",
            "--limit", "30", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--train-args", "--val-size 100 --select-subset 20"]
    report = frontier.main(argv)
    results = json.loads((tmp_path / "runs" / "eval" / "robustness.json").read_text())["results"]
    for method in ("erm", "fgsm-rs"):
        runs = [r for r in results if r["method"] == method]
        assert len(runs) == 2
        aa = [r["autoattack"]["robust_accuracy"] for r in runs]
        assert report["methods"][method]["aa_acc"]["mean"] == pytest.approx(statistics.mean(aa))
        assert report["methods"][method]["aa_acc"]["std"] == pytest.approx(statistics.stdev(aa))
        seconds = [sum(e["train_cpu_seconds"] for e in json.loads(
            (tmp_path / "runs" / f"{method}-s{seed}" / "metrics.json").read_text())["epochs"]) for seed in (0, 1)]
        assert report["methods"][method]["train_cpu_seconds"]["mean"] == pytest.approx(statistics.mean(seconds))
        assert all(s > 0 for s in seconds)
    (md,) = (tmp_path / "out").glob("frontier-*.md")
    assert "| fgsm-rs |" in md.read_text() and md.with_suffix(".png").stat().st_size > 0
    kept = [tmp_path / "runs" / "erm-s0" / "best.pt", tmp_path / "runs" / "eval" / "robustness.json"]
    before = [p.stat().st_mtime_ns for p in kept]
    assert frontier.main(argv)["methods"]["erm"]["aa_acc"] == report["methods"]["erm"]["aa_acc"]
    assert [p.stat().st_mtime_ns for p in kept] == before  # neither trained nor evaluated again
