"""The dense layers' mode timings: what is timed is the kernel each mode is written as, measured once per shape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from msq_onnx import latency
from msq_onnx.ops import DYNAMIC, FLOAT, STATIC, WEIGHT_ONLY
from msq_onnx.verify import optimized_op_counts

# the kernel ORT runs each timed model as; a timing of anything else would choose a mode on the wrong kernel
KERNELS = {STATIC: "QLinearMatMul", DYNAMIC: "DynamicQuantizeMatMul", WEIGHT_ONLY: "MatMulNBits"}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", latency.DENSE_MODES)
def test_each_timed_model_runs_as_the_kernel_its_mode_is_written_for(tmp_path, mode, bias):
    path = tmp_path / "dense.onnx"
    onnx.save(latency._dense_model(8, 32, 16, mode, bias), path)
    counts = optimized_op_counts(str(path))
    if mode == FLOAT:
        assert counts == {"Gemm" if bias else "MatMul": 1}
    else:
        assert counts[KERNELS[mode]] == 1
        assert not {"MatMul", "Gemm", "MatMulInteger"} & set(counts)
    # only static cannot take the bias into its kernel (the Add is part of its cost)
    assert counts.get("Add", 0) == (1 if bias and mode == STATIC else 0)


def test_dense_times_are_measured_once_per_row_bucket_and_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSQ_CACHE", str(tmp_path))
    latency._time_dense.cache_clear()
    measured = []
    timed = latency._time

    def counting(models, feed):
        measured.append(feed["x"].shape)
        return timed(models, feed)

    monkeypatch.setattr(latency, "_time", counting)
    try:
        first = latency.dense_mode_times(90, 24, 8)
        assert measured == [(128, 24)]  # 90 rows timed as their power-of-two bucket
        assert set(first) == set(latency.DENSE_MODES)
        assert all(np.isfinite(t) and t > 0 for t in first.values())
        latency._time_dense.cache_clear()  # a new process: only the file remains
        assert latency.dense_mode_times(100, 24, 8) == first
        assert measured == [(128, 24)]
        latency.dense_mode_times(100, 24, 8, bias=True)
        assert measured == [(128, 24), (128, 24)]  # a bias is another kernel's cost, timed apart
    finally:
        latency._time_dense.cache_clear()
