"""``cxrclip retrain`` → ``cxrclip compare --db`` → ``cxrclip promote``, end to end on a tiny model: a site whose films
look different (inverted: a shift the base misses) gives a challenger the plan promotes; reviews scrambled on purpose
give one it refuses; too few reviews are refused before training, with the counts; the split keeps a patient's
films on one side, and the films a challenger learnt from are never its evidence."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

LABELS = ["Endotracheal tube in place", "Chest tube in place", "Pneumothorax"]
SCOPE = ["Pneumothorax", "Chest tube in place"]  # what a 64 px tiny model can see (thin tubes it cannot)
PLAN = """labels: [Pneumothorax, Chest tube in place]
min_cases: {positives: 8, negatives: 8}
bootstrap: {resamples: 300}
criteria: [{metric: auroc, non_inferiority: 0.05}, {metric: auroc, superiority: 0.0, labels: any}]
"""
TRAINED_ON = 200  # the first reviews (the challenger's); the later ones are the comparison's


@pytest.fixture(scope="module")
def site(tmp_path_factory, minilm_tokenizer):
    """A base model trained on one site's films, and a second site's 360 films (normal and inverted copies)."""
    from cxrclip.config import compose
    from cxrclip.jobs import pretrain
    from cxrclip.synthetic import generate_demo_data

    out = tmp_path_factory.mktemp("retrain")
    first = generate_demo_data(out / "a", n_train=160, n_valid=60, n_test=0, image_size=64, seed=1, label_names=LABELS)
    names = f"[{','.join(LABELS)}]"
    pretrain(compose("train", [
        "model=clip_tiny", "dataloader=dataloader_cpu", "base.image_size=64", "scheduler.config.total_epochs=15",
        "optimizer.config.lr=1e-3", f"data_train.cgmh.data_path={first['train']}", f"labels.names={names}",
        f"data_valid.cgmh.data_path={first['valid']}", f"data_train.cgmh.label_names={names}",
        f"data_valid.cgmh.label_names={names}", "dataloader.train.batch_size=16", "dataloader.train.num_workers=0",
        "dataloader.valid.num_workers=0", f"base.output.checkpoint={out}/base", f"base.output.tensorboard={out}/tb",
    ]))  # fmt: skip
    from PIL import Image

    from cxrclip.fit_gate import GateFit, fit_gate_checkpoint

    fit_gate_checkpoint(out / "base" / "model-best.tar", [str(first["train"]), str(first["valid"])],
                        fit=GateFit(generated=60))  # fmt: skip

    second = generate_demo_data(out / "b", n_train=360, n_valid=0, n_test=0, image_size=64, seed=7, label_names=LABELS)
    films = []
    for row in csv.DictReader(second["train"].open()):
        image = out / "b" / ast.literal_eval(row["image"])[0]
        inverted = image.with_name(image.stem + "_inverted.png")
        Image.fromarray(255 - np.asarray(Image.open(image))).save(inverted)
        films.append((image, inverted, set(ast.literal_eval(row["text_label"]))))
    return {"base": out / "base" / "model-best.tar", "films": films, "out": out, "train": first["train"]}


def reviews_of(site, db: Path, *, inverted: bool, scrambled: int = 0, n: int | None = None) -> Path:
    """A review store of the second site's films (their images kept), the reader's verdicts the films' truth — but
    for the first ``scrambled`` reviews, whose verdicts are drawn at random."""
    from cxrclip.reviews.store import ReviewStore

    store = ReviewStore(db)
    rng = np.random.default_rng(0)
    for i, (image, flipped, present) in enumerate(site["films"][:n]):
        path = flipped if inverted else image
        verdicts = {label: "present" if label in present else "absent" for label in LABELS}
        if i < scrambled:
            verdicts = {label: str(rng.choice(["present", "absent"])) for label in LABELS}
        store.add(reviewer="Dr. Chen", image_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                  model_sha256="0" * 64, calibration="model", shown={}, verdicts=verdicts, labels=LABELS,
                  image_path=str(path), image_name=path.name)  # fmt: skip
    store.close()
    return db


@pytest.mark.parametrize("case", ["shifted site", "scrambled reviews"])
def test_a_challenger_from_reviews_is_promoted_on_a_shift_and_refused_when_the_reviews_are_wrong(site, tmp_path, case,
                                                                                                capsys):  # fmt: skip
    from cxrclip.change.promote import PromotionRefused, champion
    from cxrclip.cli import main as cli_main
    from cxrclip.model.checkpoint import load_checkpoint
    from cxrclip.reviews.store import ReviewStore

    shifted = case == "shifted site"
    db = tmp_path / "reviews.sqlite"
    # the reviews the challenger learns from, then (during its shadow weeks) those it is judged on
    reviews_of(site, db, inverted=shifted, scrambled=0 if shifted else TRAINED_ON, n=TRAINED_ON)
    out = tmp_path / "challenger"
    assert cli_main(["retrain", "--reviews", str(db), "--base", str(site["base"]), "--out", str(out),
                     "--min-reviewed", "3", "--epochs", "15"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "the whole model (the base's recipe locked nothing" in said and "best epoch" in said
    manifest = json.loads((out / "retrain.json").read_text())
    challenger = Path(manifest["challenger"]["path"])
    state = load_checkpoint(challenger)
    fit, validation = set(manifest["images"]["fit"]), set(manifest["images"]["validation"])
    assert len(fit) + len(validation) == TRAINED_ON and not fit & validation
    assert state["retrain"]["images"] == manifest["images"]  # the challenger carries what it saw
    assert state["calibration"]["fitted_on"]["path"] == str(out / "data" / "validation.csv")  # calibrated on validation
    base_gate = load_checkpoint(site["base"])["gate"]  # refitted on the challenger's own embedding:
    assert state["gate"]["kinds"] == base_gate["kinds"] and state["gate"]["coef"] != base_gate["coef"]

    store = ReviewStore(db)
    for image, flipped, present in site["films"][TRAINED_ON:]:  # later reviews, always right
        path = flipped if shifted else image
        store.add(reviewer="Dr. Lin", image_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                  model_sha256="0" * 64, calibration="model", shown={}, labels=LABELS, image_path=str(path),
                  verdicts={n: "present" if n in present else "absent" for n in LABELS})  # fmt: skip
    plan, verdict = tmp_path / "plan.yaml", tmp_path / "verdict.json"
    plan.write_text(PLAN)
    assert cli_main(["compare", "--db", str(db), "--plan", str(plan), "--challenger", str(challenger),
                     "--out", str(verdict)]) == 0  # fmt: skip
    out_json = json.loads(verdict.read_text())
    assert out_json["cases"]["rows"] == len(site["films"]) - TRAINED_ON  # none of the films it learnt from
    assert out_json["cases"]["left_out_trained_on"] == TRAINED_ON
    auroc = {r["label"]: r for r in out_json["rows"] if r["kind"] == "superiority"}
    assert set(auroc) == set(SCOPE)
    promote = ["promote", "--db", str(db), "--verdict", str(verdict), "--plan", str(plan), "--challenger",
               str(challenger), "--by", "Dr. Chen"]  # fmt: skip
    if shifted:  # the base misses the inverted site's findings; the challenger sees them
        assert out_json["decision"] == "promote", out_json["reasons"]
        assert all(r["difference"] > 0.1 and r["bound"] > 0 for r in auroc.values())
        assert cli_main(promote) == 0
        assert champion(store)["sha256"] == manifest["challenger"]["sha256"]
    else:  # the base sees this site well; a challenger taught by random verdicts does not
        assert out_json["decision"] == "refuse"
        assert all(r["champion"] > 0.75 and r["difference"] < -0.1 for r in auroc.values())
        with pytest.raises(PromotionRefused):
            from cxrclip.change.promote import promote as promote_fn

            promote_fn(store, verdict, plan, challenger, "Dr. Chen")
        with pytest.raises(SystemExit) as refused:
            cli_main(promote)
        assert refused.value.code == 2 and champion(store) is None
        assert "promotion refused" in capsys.readouterr().err
    store.close()


def test_too_few_reviews_are_refused_before_training_with_the_counts(site, tmp_path):
    from cxrclip.change.retrain import RetrainRefused, retrain
    from cxrclip.reviews.store import ReviewStore

    db = reviews_of(site, tmp_path / "reviews.sqlite", inverted=True, n=40)
    out = tmp_path / "challenger"
    with pytest.raises(RetrainRefused) as refused:
        retrain(ReviewStore(db), site["base"], out, min_reviewed=5)
    message = str(refused.value)
    assert "at least 5 reviewed positives and 5 negatives" in message and "(whole patients each; " in message
    fit_n, valid_n = (int(x) for x in message.split("each; ")[1].split(" films")[0].split(" + "))
    assert fit_n + valid_n == 40
    for label in LABELS:  # every short label is listed with its counts in both parts
        present = sum(label in p for _, _, p in site["films"][:40])
        if present < 10:
            assert f"  {label}: fit " in message
    assert not out.exists()  # nothing written
    with pytest.raises(Exception, match="not labels of"):
        retrain(ReviewStore(db), site["base"], out, scope=["Atelectasis"])


def test_the_split_keeps_a_patients_films_together(tmp_path):
    from cxrclip.change.retrain import ReviewedFilm, read_patients, split_by_patient

    films = [ReviewedFilm(Path(f"{i}.png"), f"{i:064x}", f"p{i // 3}", {}) for i in range(90)]
    fit, validation = split_by_patient(films, 0.3, seed=4)
    assert {f.patient for f in fit}.isdisjoint({f.patient for f in validation})
    assert 20 <= len(validation) <= 35 and len(fit) + len(validation) == 90
    rare = [ReviewedFilm(Path(f"{i}.png"), f"{i:064x}", f"p{i // 2}", {"A": "present" if i < 20 else "absent"})
            for i in range(120)]  # 10 patients with the finding (two films each), 50 without  # fmt: skip
    for seed in range(5):  # stratified by the scarce label: its positives on both sides, whole patients each
        fit, validation = split_by_patient(rare, 0.3, seed=seed, stratify="A")
        assert {f.patient for f in fit}.isdisjoint({f.patient for f in validation})
        positives = [sum(f.verdicts["A"] == "present" for f in part) for part in (fit, validation)]
        assert positives in ([14, 6], [12, 8]) and 30 <= len(validation) <= 50, positives
    table = tmp_path / "patients.csv"
    table.write_text("image,patient_id\na.png,P1\n")
    assert read_patients(table) == {"a.png": "P1"}
    table.write_text("image,who\na.png,P1\n")
    with pytest.raises(Exception, match="needs the columns image and patient"):
        read_patients(table)


def test_a_base_with_locked_towers_gives_a_challenger_whose_towers_are_bit_identical(site, tmp_path, capsys):
    import torch

    from cxrclip.cli import main as cli_main
    from cxrclip.model.checkpoint import load_checkpoint, save_checkpoint

    state = {k: v for k, v in load_checkpoint(site["base"]).items() if k != "format"}
    state["config"] = {**state["config"], "model": {**state["config"]["model"],
                                                    "freeze": ["image_encoder", "text_encoder"]}}  # fmt: skip
    base = save_checkpoint(tmp_path / "small_data_base.tar", state)  # as +recipe=small_data leaves a checkpoint
    db = reviews_of(site, tmp_path / "reviews.sqlite", inverted=True, n=TRAINED_ON)
    out = tmp_path / "challenger"
    from PIL import Image

    other = tmp_path / "other" / "lateral"  # the site's real non-frontal images, for the refitted gate
    other.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(16):
        Image.fromarray((rng.random((64, 48)) * 255).astype(np.uint8)).save(other / f"{i}.png")
    assert cli_main(["retrain", "--reviews", str(db), "--base", str(base), "--out", str(out), "--min-reviewed", "3",
                     "--epochs", "2", "--train", str(site["train"]),
                     "--gate-other", str(other.parent)]) == 0  # fmt: skip
    assert "the projection heads and the temperature (both towers locked" in capsys.readouterr().out
    manifest = json.loads((out / "retrain.json").read_text())
    assert [e["path"] for e in manifest["extra_train"]] == [str(site["train"].resolve())]  # the first site's data too
    challenger = load_checkpoint(out / "checkpoints" / "model-best.tar")
    assert "lateral" in challenger["gate"]["kinds"]  # the gate learnt the site's own other images
    before, after = state["model"], challenger["model"]
    towers = [k for k in before if k.startswith(("image_encoder.", "text_encoder."))]
    heads = [k for k in before if k.startswith(("image_projection.", "text_projection."))]
    assert towers and heads
    assert all(torch.equal(before[k], after[k]) for k in towers)
    assert all(not torch.equal(before[k], after[k]) for k in heads if before[k].dtype.is_floating_point)


def test_the_films_a_challenger_learnt_from_are_known_even_if_its_run_died_before_the_record(tmp_path):
    from cxrclip.change.retrain import MANIFEST, trained_on
    from cxrclip.exceptions import InputError

    checkpoint = tmp_path / "challenger" / "checkpoints" / "model-best.tar"
    checkpoint.parent.mkdir(parents=True)
    assert trained_on({}, checkpoint) == set()  # a model from elsewhere: nothing known
    (tmp_path / "challenger" / MANIFEST).write_text(
        json.dumps({"state": "training", "images": {"fit": ["a" * 64], "validation": ["b" * 64]}})
    )  # fmt: skip  (written before training began)
    assert trained_on({}, checkpoint) == {"a" * 64, "b" * 64}
    record = {"retrain": {"images": {"fit": ["c" * 64], "validation": []}}}
    assert trained_on(record, checkpoint) == {"a" * 64, "b" * 64, "c" * 64}
    (tmp_path / "challenger" / MANIFEST).write_text("{not json")
    with pytest.raises(InputError, match="lists the films this model learnt from"):
        trained_on({}, checkpoint)


def test_reviewed_films_take_the_latest_verdicts_and_a_patient_from_the_pacs_study_or_the_table(tmp_path):
    from cxrclip.change.retrain import read_patients, reviewed_films
    from cxrclip.exceptions import InputError
    from cxrclip.reviews.store import ReviewStore

    store = ReviewStore(tmp_path / "reviews.sqlite")
    films = []
    for i in range(4):
        films.append(tmp_path / f"film{i}.png")
        films[-1].write_bytes(b"png %d" % i)

    def add(i, verdict, **extra):
        return store.add(reviewer="Dr. Lin", image_sha256=hashlib.sha256(films[i].read_bytes()).hexdigest(),
                         model_sha256="0" * 64, calibration="model", shown={}, labels=LABELS,
                         verdicts={"Pneumothorax": verdict}, image_name=films[i].name, **extra)  # fmt: skip

    study = {"study": "1.2.3", "series": "1.2.3.1", "sop": "1.2.3.1.1", "sop_class": "1.2.840.10008.5.1.4.1.1.1.1"}
    first = add(0, "present", image_path=str(films[0]), dicom=study)
    add(0, "absent", image_path=str(films[0]), dicom=study, supersedes=first["id"])  # a correction replaces it
    add(1, "unsure", image_path=str(films[1]), dicom={**study, "sop": "1.2.3.1.2"})  # the same study
    add(2, "present", image_path=str(films[2]))  # a hand upload: its own patient, unless the table says
    add(3, "absent")  # its image not kept: cannot be trained on
    table = tmp_path / "patients.csv"
    table.write_text(f"image,patient\n{films[2].name},P-7\n")
    found, seen = reviewed_films(store, read_patients(table))
    assert seen == {"images_reviewed": 4, "not_kept": 1, "used": 3}
    assert [(f.image.name, f.patient, f.verdicts["Pneumothorax"]) for f in found] == [
        ("film0.png", "1.2.3", "absent"),
        ("film1.png", "1.2.3", "unsure"),
        ("film2.png", "P-7", "present"),
    ]
    films[2].unlink()  # a kept image moved away: named, before any work
    with pytest.raises(InputError, match=r"(?s)1 kept image\(s\) of reviews are missing.*film2.png"):
        reviewed_films(store)
