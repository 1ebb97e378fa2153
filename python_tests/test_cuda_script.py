"""benchmarks/run_gpu.sh, the one device script, checked where no GPU is: its
syntax, the --dry-run plan (every step, caps within the 8 / 4 minute budget),
and the preflight's one-line refusals (no nvidia-smi; torch's CUDA against
nvcc's; an architecture nvcc cannot build), with fake nvidia-smi / nvcc /
python on the PATH."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
STEPS = ["build", "tests", "memcheck", "racecheck", "bench_ops", "bench_scaling_rows", "bench_scaling_adaptive",
         "bench_step"]
# what the script itself calls before it reaches the GPU
TOOLS = ["bash", "dirname", "realpath", "sed", "grep", "head", "tr", "cat", "date", "nproc", "mkdir", "timeout",
         "git", "tail", "printf", "env"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args, path=None, env=None, cwd=ROOT):
    full_env = {**os.environ, **(env or {})}
    if path is not None:
        full_env["PATH"] = str(path)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=60)


def tool_dir(tmp_path: Path, fakes: dict) -> Path:
    """A PATH folder with the real basic tools and the given fake programs (name -> bash body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        real = shutil.which(tool)
        if real:
            (bin_dir / tool).symlink_to(real)
    for name, body in fakes.items():
        fake = bin_dir / name
        fake.write_text("#!/usr/bin/env bash\n" + body + "\n")
        fake.chmod(0o755)
    return bin_dir


NVIDIA_SMI = """case "$*" in
  *--query-gpu*) echo "NVIDIA H200, 580.159.03, 143771 MiB" ;;
  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-0)" ;;
esac"""


def nvcc(release: str, archs=("compute_80", "compute_90")) -> str:
    return f"""case "$1" in
  --version) echo "Cuda compilation tools, release {release}, V{release}.1" ;;
  --list-gpu-arch) printf '%s\\n' {' '.join(archs)} ;;
esac"""


def fake_python(info: str) -> str:
    return f'echo "{info}"'


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.parametrize("quick,budget", [(False, 480), (True, 240)], ids=["full", "quick"])
def test_dry_run_lists_every_step_within_the_budget(quick, budget):
    done = run("--dry-run", *(["--quick"] if quick else []), path=None)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for step in ["preflight"] + STEPS:
        assert any(re.match(rf"\s+{step}\s+cap", line) for line in lines), f"{step} missing:\n{done.stdout}"
    caps = [int(m.group(1)) for m in re.finditer(r"cap\s+(\d+)s", done.stdout)]
    total = int(re.search(r"total of the caps: (\d+) s", done.stdout).group(1))
    assert sum(caps) == total <= budget
    assert "TORCH_CUDA_ARCH_LIST=$ARCH" in done.stdout  # the device's own architecture only
    assert "compute-sanitizer --tool memcheck" in done.stdout and "compute-sanitizer --tool racecheck" in done.stdout
    assert "--layout adaptive" in done.stdout and "bench_step.py --device cuda" in done.stdout
    assert ("-quick/" in lines[0]) == quick


def test_unknown_option_refused():
    done = run("--fast")
    assert done.returncode == 2 and "unknown option '--fast'" in done.stderr


def test_no_nvidia_smi_one_line(tmp_path):
    out = tmp_path / "results"
    done = run("--out", str(out), path=tool_dir(tmp_path, {}))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["run_gpu.sh: no NVIDIA GPU here (nvidia-smi not found); nothing was run"]
    assert not out.exists()


@pytest.mark.parametrize(
    "case,torch_info,nvcc_release,archs,message",
    [
        ("cuda-major", "2.11.0+cu130 13.0 1 9.0", "12.4", ("compute_90",),
         "torch 2.11.0+cu130 was built with CUDA 13.0 but nvcc is 12.4: extensions need the same CUDA major version"),
        ("cpu-torch", "2.11.0+cpu - 0 -", "13.0", ("compute_90",), "torch 2.11.0+cpu is a CPU-only build"),
        ("no-gpu-for-torch", "2.11.0+cu130 13.0 0 -", "13.0", ("compute_90",),
         "torch 2.11.0+cu130 (CUDA 13.0) sees no usable GPU"),
        ("unknown-arch", "2.11.0+cu130 13.0 1 9.0", "13.0", ("compute_75", "compute_80"),
         "nvcc 13.0 cannot compile for this GPU's architecture sm_90"),
    ],
)
def test_preflight_refuses_in_one_line(case, torch_info, nvcc_release, archs, message, tmp_path):
    bin_dir = tool_dir(tmp_path, {"nvidia-smi": NVIDIA_SMI, "nvcc": nvcc(nvcc_release, archs),
                                  "fakepython": fake_python(torch_info)})
    out = tmp_path / "results"
    done = run("--out", str(out), path=bin_dir, env={"PYTHON": "fakepython"})
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("run_gpu.sh: ") and message in line and line.endswith("; nothing was run"), line
    assert not out.exists()


def test_no_nvcc_one_line(tmp_path):
    bin_dir = tool_dir(tmp_path, {"nvidia-smi": NVIDIA_SMI})
    done = run("--out", str(tmp_path / "r"), path=bin_dir, env={"CUDA_HOME": str(tmp_path / "none")})
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "no CUDA compiler" in line
