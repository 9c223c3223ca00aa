"""Every job fails cleanly and loses nothing: one-line user errors, bad images in a batch, kill -9 during a
checkpoint save, a full disk, SIGTERM during evaluation, two runs in one folder."""

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cxrclip.config import compose
from cxrclip.exceptions import OutputError
from cxrclip.model.checkpoint import load_checkpoint, require_training_state, save_checkpoint
from cxrclip.paths import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")


def run(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CXRCLIP_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def bad_images(folder):
    """Missing, zero-byte, truncated, not an image, an empty directory: each must give a one-line error."""
    good = folder / "good.png"
    from PIL import Image

    Image.fromarray((np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)).save(good)
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good.read_bytes()[:60])
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "nothing_here").mkdir()
    return {
        "missing": folder / "missing.png",
        "zero-byte": folder / "empty.png",
        "truncated": folder / "truncated.png",
        "non-image": folder / "notes.png",
        "directory": folder / "nothing_here",
    }


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), lines[0]


def test_inference_py_gives_one_line_errors_for_bad_images(tiny_clip_checkpoint, tmp_path):
    for case, path in bad_images(tmp_path).items():
        ckpt = str(tiny_clip_checkpoint)
        done = run([sys.executable, "inference.py", "--model_path", ckpt, "--image_path", str(path)])
        assert_one_line_error(done, str(path.name))
        assert case  # (the case name shows in pytest's locals on failure)


def test_cxrclip_infer_and_a_bad_checkpoint_give_one_line_errors(tiny_clip_checkpoint, tmp_path):
    paths = bad_images(tmp_path)
    done = run([sys.executable, "-m", "cxrclip.cli", "infer", "--model_path", str(tiny_clip_checkpoint),
                "--image_path", str(paths["truncated"])])  # fmt: skip
    assert_one_line_error(done, "truncated.png")
    (tmp_path / "broken.tar").write_bytes(b"PK\x03\x04 not really a checkpoint")
    done = run([sys.executable, "inference.py", "--model_path", str(tmp_path / "broken.tar"),
                "--image_path", str(tmp_path / "good.png")])  # fmt: skip
    assert_one_line_error(done, "broken.tar")


def test_evaluate_clip_py_names_the_bad_image_and_row(tiny_clip_checkpoint, demo_data, tmp_path):
    rows = (demo_data / "test.csv").read_text().splitlines()
    shutil.copytree(demo_data / "images", tmp_path / "images")
    (tmp_path / "images" / rows[2].split(",")[0].strip("'[]\"").split("/")[-1]).write_bytes(b"")
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    done = run([sys.executable, "evaluate_clip.py", f"test.checkpoint={tiny_clip_checkpoint}",
                f"data_test.cgmh.data_path={tmp_path / 'test.csv'}", f"hydra.run.dir={tmp_path / 'h'}",
                f"test.output_dir={tmp_path / 'out'}", "base.image_size=32",
                "dataloader.test.num_workers=0"])  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{tmp_path / 'test.csv'}:3:" in done.stderr
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_a_folder_with_some_bad_images_predicts_the_good_ones_and_lists_the_rest(tiny_clip_checkpoint, tmp_path,
                                                                                capsys):  # fmt: skip
    from cxrclip.infer import main

    folder = tmp_path / "batch"
    folder.mkdir()
    paths = bad_images(folder)
    out = tmp_path / "pred.csv"
    assert main(["--model_path", str(tiny_clip_checkpoint), "--image_path", str(folder), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "3 of 4 images could not be read" in err and "empty.png" in err and "notes.png" in err
    import csv

    rows = {r["image"]: r for r in csv.DictReader(out.open())}
    assert rows[str(folder / "good.png")]["error"] == "" and rows[str(folder / "good.png")]["top_candidate"]
    for name in ("empty.png", "truncated.png", "notes.png"):
        assert rows[str(folder / name)]["error"].startswith("cannot decode image")
    assert paths["missing"].name not in {os.path.basename(p) for p in rows}  # a folder lists what is there


def test_validate_data_catches_a_truncated_dicom_with_the_csv_line(tmp_path, capsys):
    from cxrclip.cli import main
    from tests.test_images import write_dicom

    write_dicom(tmp_path / "ok.dcm", np.arange(40 * 30).reshape(40, 30) % 4096)
    data = (tmp_path / "ok.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-50])
    (tmp_path / "t.csv").write_text("image,text_label\nok.dcm,[]\ncut.dcm,[]\n")
    assert main(["validate-data", str(tmp_path / "t.csv")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 't.csv'}:3: DICOM pixel data is truncated (2350 of 2400 bytes)" in err
    assert "t.csv:2" not in err


def test_deep_validation_names_the_csv_line(tmp_path, capsys):
    from cxrclip.cli import main

    bad_images(tmp_path)
    (tmp_path / "t.csv").write_text("image,text_label\ngood.png,[]\ntruncated.png,[]\n")
    assert main(["validate-data", str(tmp_path / "t.csv"), "--deep"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 't.csv'}:3:" in err and "truncated.png" in err and "t.csv:2" not in err


def test_a_blank_label_cell_is_an_error_unless_the_config_says_what_it_means(demo_data, tmp_path):
    from cxrclip.data.records import load_labeled_records
    from cxrclip.data.schema import DataConfig, DataValidationError

    lines = (demo_data / "test.csv").read_text().splitlines()
    header = lines[0].split(",")
    column = header.index("Pneumothorax")
    cells = lines[1].split(",")
    cells[column] = ""
    shutil.copytree(demo_data / "images", tmp_path / "images")
    (tmp_path / "t.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    labels = tuple(n for n in header if n not in ("image", "text"))
    cfg = DataConfig(name="t", data_type="imagetext_eval", data_path=str(tmp_path / "t.csv"), label_names=labels)
    with pytest.raises(DataValidationError, match=r"t\.csv:2: column 'Pneumothorax': blank label"):
        load_labeled_records(cfg, need_text=True)
    for meaning, value in (("excluded", -1), ("negative", 0)):
        cfg = DataConfig(**{**cfg.__dict__, "blank_labels": meaning})
        assert load_labeled_records(cfg, need_text=True)[0].labels[labels.index("Pneumothorax")] == value


# -- checkpoints under kill -9 and a full disk ------------------------------------------------------------
def _save_forever(path, state, payload):
    # runs in a forked child: no multi-threaded tensor work here (OpenMP is not fork-safe), only saves
    step = state["step"]
    while True:
        step += 1
        model = {**state["model"], "payload": payload, "marker": torch.tensor([step])}
        save_checkpoint(path, {**state, "step": step, "model": model})


def test_kill_9_during_checkpoint_saves_never_loses_the_previous_one(tiny_clip_checkpoint, demo_data, tmp_path):
    from cxrclip.engine.trainer import train
    from tests.test_trainer import tiny_cfg

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    last = folder / "model-last.tar"
    shutil.copy(tiny_clip_checkpoint.parent / "model-last.tar", last)
    state = load_checkpoint(last)
    rng = random.Random(0)
    payload = torch.ones(4_000_000)  # ~16 MB: a save takes a while, so kills land inside one
    ctx = multiprocessing.get_context("fork")
    seen = set()
    for _ in range(20):
        before = load_checkpoint(last)["step"]
        child = ctx.Process(target=_save_forever, args=(last, {**state, "step": before}, payload))
        child.start()
        time.sleep(rng.uniform(0.05, 1.0))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        ckpt = load_checkpoint(last)  # always a whole checkpoint: the old one or a newer complete one
        require_training_state(ckpt, last)
        assert ckpt["step"] >= before
        if ckpt["step"] > state["step"]:  # a save of the child's completed: all of it is there
            assert int(ckpt["model"]["marker"]) == ckpt["step"] and torch.equal(ckpt["model"]["payload"], payload)
        seen.add(ckpt["step"])
    assert len(seen) > 1  # the kills landed at different points
    ckpt = load_checkpoint(last)
    ckpt["model"].pop("payload", None)
    ckpt["model"].pop("marker", None)
    save_checkpoint(last, {k: v for k, v in ckpt.items() if k != "format"})
    result = train(tiny_cfg(demo_data, tmp_path, f"base.resume={last}", epochs=2))
    assert result["epoch"] == 2 and not result["stopped"]
    assert not list(folder.glob(".*.tmp"))  # the resumed run cleared the killed saves' temp files


def _mount_small_tmpfs(folder, size="3m"):
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    return folder


def test_a_full_disk_keeps_the_previous_checkpoint_and_results(tmp_path):
    disk = _mount_small_tmpfs(tmp_path / "disk")
    try:
        save_checkpoint(disk / "model-last.tar", {"model": {"w": torch.ones(1000)}, "step": 1})
        with pytest.raises(OutputError, match="cannot write .*model-last.tar: .*previous file is unchanged"):
            save_checkpoint(disk / "model-last.tar", {"model": {"w": torch.ones(2_000_000)}, "step": 2})
        assert load_checkpoint(disk / "model-last.tar")["step"] == 1
        assert not list(disk.glob(".*.tmp"))
        from cxrclip.eval.report import write_json_merged

        write_json_merged(disk / "results-x.json", {"old.tar": {"AUROC": 0.7}})
        (disk / "filler").write_bytes(b"\0" * (disk_free(disk) - 100))
        with pytest.raises(OutputError):
            write_json_merged(disk / "results-x.json", {"new.tar": {"text": "x" * 100_000}})
        assert json.loads((disk / "results-x.json").read_text()) == {"old.tar": {"AUROC": 0.7}}
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def disk_free(path):
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_a_failing_write_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    """The same promise without a mount: torch.save dies half-way with ENOSPC."""
    path = save_checkpoint(tmp_path / "model-last.tar", {"model": {"w": torch.ones(3)}, "step": 1})
    real_save = torch.save

    def half_then_full(obj, f, *a, **kw):
        real_save({"partial": torch.ones(10)}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OutputError, match="No space left on device; the previous file is unchanged"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and not list(tmp_path.glob(".*.tmp"))


# -- evaluation under SIGTERM; two runs in one folder ----------------------------------------------------
def test_sigterm_during_evaluation_leaves_the_old_results(tiny_clip_checkpoint, demo_data, tmp_path):
    rows = (demo_data / "test.csv").read_text().splitlines()
    shutil.copytree(demo_data / "images", tmp_path / "images")
    (tmp_path / "big.csv").write_text("\n".join([rows[0], *(rows[1:] * 60)]) + "\n")  # 720 rows
    out = tmp_path / "out"
    out.mkdir()
    old = {"earlier.tar": {"zeroshot_binary": {"AUROC(Avg)": 0.5}}}
    (out / "results-cgmh.json").write_text(json.dumps(old))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    import threading

    seen = []
    proc = subprocess.Popen(
        [sys.executable, "evaluate_clip.py", f"test.checkpoint={tiny_clip_checkpoint}",
         f"data_test.cgmh.data_path={tmp_path / 'big.csv'}", f"test.output_dir={out}",
         f"hydra.run.dir={tmp_path / 'h'}",
         "base.image_size=32", "dataloader.test.num_workers=0", "dataloader.test.batch_size=2"],
        cwd=PROJECT_ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "cgmh images" not in "".join(seen) and proc.poll() is None:
        time.sleep(0.05)  # wait until it is embedding images (tqdm's bar on stderr)
    assert proc.poll() is None, "".join(seen)[-2000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert json.loads((out / "results-cgmh.json").read_text()) == old
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.md"))


def test_a_second_run_in_a_folder_with_checkpoints_is_refused(demo_data, tmp_path):
    from cxrclip.engine.trainer import train
    from tests.test_trainer import tiny_cfg

    train(tiny_cfg(demo_data, tmp_path, epochs=1))
    before = (tmp_path / "checkpoints" / "model-last.tar").read_bytes()
    with pytest.raises(OutputError, match="already holds model-last.tar and model-best.tar.*base.overwrite=true"):
        train(tiny_cfg(demo_data, tmp_path, epochs=1))
    assert (tmp_path / "checkpoints" / "model-last.tar").read_bytes() == before
    assert train(tiny_cfg(demo_data, tmp_path, "base.overwrite=true", epochs=1))["epoch"] == 1


def test_an_unwritable_output_folder_is_a_clear_error(tiny_clip_checkpoint, demo_data, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; cannot test permissions as root")
    from cxrclip.eval.evaluate import evaluate
    from tests.test_eval import eval_cfg

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            evaluate(eval_cfg(demo_data, tiny_clip_checkpoint, locked))
    finally:
        locked.chmod(0o700)


def test_compose_error_for_an_unset_checkpoint_is_one_line(tmp_path):
    done = run([sys.executable, "evaluate_clip.py", f"hydra.run.dir={tmp_path}"])
    assert_one_line_error(done, "test.checkpoint")


def test_debug_shows_the_traceback(tiny_clip_checkpoint, tmp_path):
    done = run([sys.executable, "inference.py", "--model_path", str(tiny_clip_checkpoint),
                "--image_path", str(tmp_path / "missing.png"), "--debug"])  # fmt: skip
    assert done.returncode != 0 and "Traceback" in done.stderr
    assert compose  # (imported for the configs above)
