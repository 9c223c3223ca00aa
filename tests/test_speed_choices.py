"""The fast paths' choices, for this machine and for others: what the OS says about a CPU, the inference precision,
the image encoder's memory format and the retrieval tile (the choice functions, not timings), and that the fast
paths answer what the slow ones do."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

from cxrclip.eval import metrics
from cxrclip.eval.metrics import choose_tile, retrieval_metrics, tile_candidates
from cxrclip.exceptions import ConfigError
from cxrclip.hardware import CpuInfo, read_cpuinfo, resolve_precision
from cxrclip.model.speed import is_convolutional, parse_channels_last, use_channels_last

# What /proc/cpuinfo and sysfs say on the two machine kinds this project runs on.
EPYC = CpuInfo("AMD EPYC 7B13", frozenset({"avx2", "fma"}), 512 * 2**10, 32 * 2**20)
XEON = CpuInfo(
    "Intel(R) Xeon(R) Platinum 8488C", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), 2 * 2**20, 105 * 2**20
)


def write_cache(folder, index, level, kind, size):
    d = folder / f"index{index}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")


def test_cpuinfo_and_sysfs_caches_are_read(tmp_path):
    text = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
        "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\nmodel name\t: other\n"
    )
    write_cache(tmp_path, 0, 1, "Data", "48K")
    write_cache(tmp_path, 1, 1, "Instruction", "32K")
    write_cache(tmp_path, 2, 2, "Unified", "2048K")
    write_cache(tmp_path, 3, 3, "Unified", "107520K")
    cpu = read_cpuinfo(text, tmp_path)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8488C"  # the first processor's
    assert cpu.native_bf16 and cpu.vendor == "intel"
    assert (cpu.l2_bytes, cpu.l3_bytes) == (2 * 2**20, 105 * 2**20)
    assert "L2 2 MB/core" in cpu.describe() and "native bf16" in cpu.describe()
    amd = read_cpuinfo("model name\t: AMD EPYC 7B13\nflags\t: avx2 fma\n", tmp_path / "missing")
    assert amd.vendor == "amd" and not amd.native_bf16 and amd.l2_bytes is None


def test_precision_auto_is_fp32_and_bf16_is_kept_when_asked_for(caplog):
    # auto is fp32 on every machine: bf16 moved the demo's calibrated probabilities by up to 0.17 (PERFORMANCE.md)
    assert {resolve_precision(p, d, c) for p in ("auto", None) for d in ("cpu", "cuda:0") for c in (XEON, EPYC)} == {
        "fp32"
    }
    assert resolve_precision("fp32", "cpu", XEON) == "fp32"
    assert resolve_precision("bf16", "cpu", XEON) == "bf16" and not caplog.records
    assert resolve_precision("bf16", "cpu", EPYC) == "bf16"  # asked for: kept, emulated, with a warning
    assert "emulated, slower than fp32" in caplog.text
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("fp16", "cpu", XEON)


class PatchEmbedOnly(nn.Module):
    """A ViT's shape of convolution: one patch embedding, then linear layers."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.mlp = nn.Linear(8, 8)


def test_channels_last_auto_is_on_for_convolutional_encoders_on_the_cpu():
    cnn = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    assert is_convolutional(cnn) and not is_convolutional(PatchEmbedOnly())
    assert use_channels_last("auto", cnn, "cpu")
    assert not use_channels_last("auto", PatchEmbedOnly(), "cpu")
    assert not use_channels_last("auto", cnn, "cuda")  # CUDA fp32: unmeasured, left as it was
    assert use_channels_last("auto", cnn, "cuda", autocast=True)  # the tensor-core layout
    assert not use_channels_last(False, cnn, "cpu") and use_channels_last("true", PatchEmbedOnly(), "cpu")
    assert [parse_channels_last(v) for v in ("auto", "TRUE", "off", None)] == ["auto", True, False, "auto"]
    with pytest.raises(ConfigError, match="auto, true or false"):
        parse_channels_last("sometimes")


def test_retrieval_tile_candidates_follow_the_caches():
    # the EPYC (a CCX's 32 MB L3, 512 KB L2): the 2048² tile tuned there first, then a 64-row L2 tile
    assert tile_candidates(EPYC) == [(2048, 2048), (64, 1024), (1024, 1024)]
    # the Xeon (2 MB L2 per core, a shared mesh L3): the L2 tile first, 256 rows × 1024 texts = 1.3 MB
    assert tile_candidates(XEON) == [(256, 1024), (2048, 2048), (1024, 1024)]
    assert tile_candidates(CpuInfo()) == [(2048, 2048), (128, 1024), (1024, 1024)]  # nothing known
    assert choose_tile({(2048, 2048): 3e-9, (256, 1024): 2e-9, (1024, 1024): 2.5e-9}) == (256, 1024)
    assert choose_tile({(256, 1024): 2e-9, (1024, 1024): 2e-9}) == (1024, 1024)  # a tie: the larger tile


@pytest.mark.parametrize("cpu", [EPYC, XEON], ids=["epyc", "xeon"])
def test_the_probe_chooses_a_tile_and_the_ranks_do_not_depend_on_it(cpu, monkeypatch):
    monkeypatch.setattr(metrics, "_CHOSEN", {})
    monkeypatch.setattr(metrics, "PROBE_MIN_PAIRS", 0)  # probe even at this size
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(2600, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(1500, 16, generator=g), dim=-1)
    gt = torch.randint(0, 1500, (2600,), generator=g)
    got = retrieval_metrics(img, txt, gt, cpu=cpu)
    chosen = metrics._CHOSEN[(16, 4)]
    assert chosen in tile_candidates(cpu)
    assert retrieval_metrics(img, txt, gt) == got  # the chosen tile, reused by the next call
    assert retrieval_metrics(img, txt, gt, chunk=700) == got  # any tile: the same counts
    sim = img @ txt.T  # brute force
    i2t = 1 + (sim > sim[torch.arange(2600), gt][:, None] + metrics.TIE_TOLERANCE).sum(1)
    assert got["retrieval_i2t"]["Recall@5"] == pytest.approx(float((i2t <= 5).double().mean()))


def test_bf16_runs_the_image_encoder_in_bf16_and_only_when_asked(tiny_clip_checkpoint, demo_data):
    """``--precision bf16`` runs the image encoder under bf16 autocast (the probabilities move a little), the default
    runs fp32; the rest of the answer (prompts, calibration, gate) is fp32 in both."""
    from cxrclip.data.images import read_image
    from cxrclip.predict import load_predictor

    images = sorted((demo_data / "images").glob("test_*.png"))
    fp32 = load_predictor(tiny_clip_checkpoint, device="cpu")
    bf16 = load_predictor(tiny_clip_checkpoint, device="cpu", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert np.array_equal(fp32.pos_emb, bf16.pos_emb)  # prompts: fp32 in both
    conv = next(m for m in fp32.loaded.model.image_encoder.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # auto: NHWC for the CNN on the CPU
    tensors = [fp32.transform(read_image(path)) for path in images]
    e32, e16 = fp32.embed(tensors), bf16.embed(tensors)
    assert e16.dtype == np.float32 and np.allclose(np.linalg.norm(e16, axis=1), 1, atol=1e-5)
    diff = np.abs(e32 - e16).max()
    assert 0 < diff < 0.1  # it did run in bf16 (8-bit mantissa), and stayed close
    again = load_predictor(tiny_clip_checkpoint, device="cpu").embed(tensors)
    assert np.array_equal(again, e32)  # fp32 is deterministic: the same embedding twice


def test_auto_is_bf16_only_for_a_model_calibrated_in_bf16_on_a_device_that_computes_it(caplog):
    assert resolve_precision("auto", "cpu", XEON, calibrated="bf16") == "bf16"
    assert resolve_precision("auto", "cpu", EPYC, calibrated="bf16") == "fp32"  # emulated bf16: no gain
    assert resolve_precision("auto", "cpu", XEON, calibrated="fp32") == "fp32"
    assert resolve_precision("auto", "cpu", XEON, calibrated=None) == "fp32"  # never calibrated
    caplog.clear()
    assert resolve_precision("bf16", "cpu", XEON, calibrated="fp32") == "bf16"  # asked for: kept, and said
    assert "the calibration was fitted under fp32" in caplog.text


def test_a_model_calibrated_in_bf16_answers_in_bf16_where_native_and_its_decisions_do_not_move(
    tiny_clip_checkpoint, demo_data, tmp_path, monkeypatch
):
    """Calibration fitted under the precision that answers: ``cxrclip calibrate --precision bf16`` records it,
    ``--precision auto`` then answers in bf16 on a CPU with native bf16 (fp32 elsewhere), and the same bf16 run
    gives the same probabilities and decisions every time."""
    from cxrclip.cli import main as cli_main
    from cxrclip.model.checkpoint import load_checkpoint
    from cxrclip.predict import load_predictor

    out = tmp_path / "bf16-calibrated.tar"
    argv = ["calibrate", "--checkpoint", str(tiny_clip_checkpoint), "--data", str(demo_data / "valid.csv"),
            "--precision", "bf16", "--min-positives", "1", "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    assert load_checkpoint(out)["calibration"]["fitted_on"]["precision"] == "bf16"
    images = sorted((demo_data / "images").glob("test_*.png"))
    monkeypatch.setattr("cxrclip.hardware.this_cpu", lambda: XEON)  # a CPU with AMX
    answering = load_predictor(out, device="cpu")
    assert answering.precision == "bf16" and answering.card()["precision"] == "bf16"
    assert load_predictor(tiny_clip_checkpoint, device="cpu").precision == "fp32"  # calibrated in fp32
    first = [a.to_json() for a in answering.predict(images)]
    again = [a.to_json() for a in load_predictor(out, device="cpu").predict(images)]
    assert [a["labels"] for a in first] == [a["labels"] for a in again]  # the same decisions, to the digit
    monkeypatch.setattr("cxrclip.hardware.this_cpu", lambda: EPYC)  # no native bf16: fp32
    assert load_predictor(out, device="cpu").precision == "fp32"
