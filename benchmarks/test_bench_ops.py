"""pytest-benchmark of fd_direction at [256, 3072] fp32: fused vs eager vs torch.compile.

    pytest benchmarks --benchmark-only            # times them side by side in one group
    pytest benchmarks -q --benchmark-disable      # each runs once: a correctness smoke test

Not collected by the main suite (``pytest`` runs ``python_tests``). The
variants, inputs and correctness check are those of ``bench_ops.py``.
"""
from __future__ import annotations

import pytest
import torch

import bench_ops

SHAPE, DTYPE = (256, 3072), torch.float32
SPEC = next(spec for spec in bench_ops.OPS if spec.name == "fd_direction")


@pytest.fixture(scope="module")
def case():
    """(variants, reference output, x) of fd_direction at SHAPE, DTYPE on the CPU."""
    torch.manual_seed(0)
    torch.compiler.reset()
    tensors, scalars = bench_ops.make_inputs(SPEC, SHAPE, DTYPE, "cpu")
    yield bench_ops.make_variants(SPEC, tensors, scalars), SPEC.reference(*tensors, *scalars), tensors[0]
    torch.compiler.reset()


@pytest.mark.benchmark(group="fd_direction [256, 3072] float32")
@pytest.mark.parametrize("variant", ["fused", "eager", "compiled"])
def test_fd_direction(benchmark, case, variant):
    """Check the variant against ater_ext.reference (this also compiles it), then time it."""
    variants, want, x = case
    fn = variants[variant]
    bench_ops.assert_matches_reference(f"fd_direction {variant}", fn(), want, x)
    benchmark(fn)
