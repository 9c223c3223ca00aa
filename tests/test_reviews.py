"""The review store: append-only (the database itself refuses UPDATE and DELETE), corrections as new rows, the Alembic
schema equal to the code's tables, a newer schema refused, kill -9 during saves, and the same on PostgreSQL."""

from __future__ import annotations

import ast
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from cxrclip.exceptions import ConfigError, InputError
from cxrclip.predict import PredictorOptions
from cxrclip.reviews.store import ReviewStore, head_revision, metadata

ARTIFACTS = Path(__file__).parent / "artifacts"
LABELS = ["Pneumothorax", "Chest tube in place"]
SHOWN = {"Pneumothorax": {"probability": 0.31, "threshold": 0.4, "present": False, "calibrated": True}}


def review(store: ReviewStore, verdict: str = "present", **extra) -> dict:
    fields = {"reviewer": "Dr. Lin", "image_sha256": "ab" * 32, "model_sha256": "cd" * 32, "calibration": "default",
              "shown": SHOWN, "verdicts": {"Pneumothorax": verdict}, "labels": LABELS, **extra}  # fmt: skip
    return store.add(**fields)


def check_store(store: ReviewStore) -> None:
    first = review(store, comment="  small apical PTX  ")
    assert first["verdicts"] == {"Pneumothorax": "present"} and first["comment"] == "small apical PTX"
    assert first["shown"] == SHOWN and first["supersedes"] is None and first["reviewer"] == "Dr. Lin"
    assert datetime.datetime.fromisoformat(first["created_at"]).tzinfo is not None
    fixed = review(store, "absent", supersedes=first["id"])
    other = review(store, "unsure", image_sha256="ef" * 32)
    assert [r["id"] for r in store.list()] == [first["id"], fixed["id"], other["id"]]
    assert [r["id"] for r in store.current()] == [fixed["id"], other["id"]]
    assert [r["id"] for r in store.list(since=datetime.datetime.fromisoformat(fixed["created_at"]))] == [other["id"]]
    for statement in ("UPDATE cxrclip_reviews SET reviewer = 'someone else'", "DELETE FROM cxrclip_reviews"):
        with pytest.raises(DBAPIError, match="append-only"):
            with store.engine.begin() as conn:
                conn.execute(text(statement))
    assert [r["reviewer"] for r in store.list()] == ["Dr. Lin"] * 3
    # the answers, a challenger's shadow answers and the promotions are as append-only as the reviews
    answer = {"analysed": True, "labels": {"Pneumothorax": {"probability": 0.7, "present": True}}}
    store.log_prediction("ab" * 32, "11" * 32, "model", answer)
    store.log_prediction("ab" * 32, "22" * 32, "model", answer, role="shadow")
    store.add_model_change(action="promote", by="Dr. Chen", from_sha256="11" * 32, from_path="a.tar",
                           to_sha256="22" * 32, to_path="b.tar", plan_sha256="33" * 32, evidence="{}")  # fmt: skip
    for statement in ("UPDATE cxrclip_predictions SET model_sha256 = 'x'", "DELETE FROM cxrclip_predictions",
                      "UPDATE cxrclip_model_changes SET to_path = 'c.tar'",
                      "DELETE FROM cxrclip_model_changes"):  # fmt: skip
        with pytest.raises(DBAPIError, match="append-only"):
            with store.engine.begin() as conn:
                conn.execute(text(statement))
    assert [r["model_sha256"] for r in store.predictions(role="shadow")] == ["22" * 32]
    assert store.predictions(role="shadow", images=["cd" * 32]) == []  # the queue asks only of the images it holds
    assert len(store.predictions(images=["ab" * 32, "cd" * 32])) == 1
    assert store.reviewed_images(["ef" * 32, "12" * 32]) == {"ef" * 32}
    assert [r["to_path"] for r in store.model_changes()] == ["b.tar"]


def check_bounds(store: ReviewStore) -> None:
    """Every field of the append-only store is bounded, and refused the same way on SQLite and PostgreSQL."""
    before = len(store.list())
    for change, message in [
        ({"reviewer": "x" * 10_000}, "reviewer: 10000 characters, at most 128"),
        ({"comment": "y" * 4001}, "comment: 4001 characters, at most 4000"),
        ({"comment": "apical\x00PTX"}, "comment: control character U\\+0000 at position 6"),
        ({"comment": "\x1b[31mred"}, "control character U\\+001B"),
        ({"reviewer": "Dr.\tLin"}, "reviewer: control character U\\+0009"),
    ]:
        with pytest.raises(InputError, match=message):
            review(store, **change)
    assert len(store.list()) == before
    kept = review(store, reviewer="x" * 128, comment="line one\n\tline two " + "z" * 3970, image_name="a\x00b.png")
    assert kept["reviewer"] == "x" * 128 and kept["comment"].startswith("line one\n\tline two")
    assert kept["image_name"] == "a?b.png"
    assert store.list()[-1]["comment"] == kept["comment"]


def test_reviews_are_append_only_and_corrections_are_new_rows(tmp_path):
    store = ReviewStore(tmp_path / "reviews.sqlite")
    assert store.revision == head_revision()
    check_store(store)
    check_bounds(store)
    assert len(ReviewStore(tmp_path / "reviews.sqlite").list()) == 4  # reopened: migrated once, nothing lost


@pytest.mark.parametrize(
    "change, message",
    [
        ({"verdicts": {"Atelectasis": "present"}}, "unknown labels \\['Atelectasis'\\]"),
        ({"verdicts": {"Pneumothorax": "yes"}}, "must be one of"),
        ({"verdicts": {}}, "at least one label"),
        ({"reviewer": "  "}, "reviewer's name"),
        ({"image_sha256": "not-a-hash"}, "64 lowercase hex"),
        ({"supersedes": 999}, "no review 999"),
    ],
)
def test_a_bad_review_is_refused_with_its_reason_and_nothing_is_saved(tmp_path, change, message):
    store = ReviewStore(tmp_path / "reviews.sqlite")
    with pytest.raises(InputError, match=message):
        review(store, **change)
    assert store.list() == []


def test_a_correction_of_another_images_review_is_refused(tmp_path):
    store = ReviewStore(tmp_path / "reviews.sqlite")
    first = review(store)
    with pytest.raises(InputError, match="another image"):
        review(store, image_sha256="ef" * 32, supersedes=first["id"])


def test_the_migrated_schema_is_the_codes_schema(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    store = ReviewStore(tmp_path / "reviews.sqlite")
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_a_database_of_a_newer_schema_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "reviews.sqlite"
    store = ReviewStore(path)
    review(store)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    store.close()
    with pytest.raises(ConfigError, match="schema revision 0099_from_the_future, newer than this cxrclip"):
        ReviewStore(path)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cxrclip_reviews")).scalar() == 1


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "reviews.sqlite"
    bad.write_text("not a database, just text" * 100)
    with pytest.raises(ConfigError, match="cannot open the review store"):
        ReviewStore(bad)


WRITER = """
import sys
from cxrclip.reviews.store import ReviewStore
store = ReviewStore(sys.argv[1])
for i in range(100000):
    store.add(reviewer=f"r{i}", image_sha256=f"{i:064x}", model_sha256="c" * 64, calibration="default",
              shown={"Pneumothorax": {"probability": i / 1e5}}, verdicts={"Pneumothorax": "absent"},
              labels=["Pneumothorax"], comment="x" * 2000)
    print(i, flush=True)
"""


def test_kill_9_during_saves_loses_no_saved_review_and_leaves_no_half_row(tmp_path):
    path = tmp_path / "reviews.sqlite"
    ReviewStore(path).close()  # migrated before the writers start
    for round_ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        acknowledged = -1
        deadline = time.monotonic() + 60
        while acknowledged < 5 + 7 * round_ and time.monotonic() < deadline:
            acknowledged = int(writer.stdout.readline())
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        rows = ReviewStore(path).list()
        saved = [r for r in rows if r["reviewer"] == f"r{acknowledged}"]
        assert saved, f"round {round_}: review {acknowledged} was acknowledged, then lost"
        assert all(r["comment"] == "x" * 2000 and r["verdicts"] == {"Pneumothorax": "absent"} for r in rows)
    with ReviewStore(path).engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"


def test_the_same_store_on_postgresql(postgres):
    store = ReviewStore(postgres.new_database("reviews"))
    assert store.revision == head_revision()
    check_store(store)
    check_bounds(store)
    store.close()


@pytest.fixture
def reviewing(tiny_clip_checkpoint, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cxrclip.serve.app import ServeSettings, Service, create_app

    settings = ServeSettings(model=PredictorOptions(str(tiny_clip_checkpoint)), db=str(tmp_path / "reviews.sqlite"),
                             keep_images=str(tmp_path / "kept"))  # fmt: skip
    service = Service(settings)
    return TestClient(create_app(settings, service)), service


def test_a_review_through_the_api_records_what_the_server_showed(reviewing, demo_data, tmp_path):
    import hashlib

    client, service = reviewing
    png = sorted((demo_data / "images").glob("test_*.png"))[0].read_bytes()
    shown = client.post("/v1/predict", files={"file": ("film.png", png, "image/png")}).json()
    sha = hashlib.sha256(png).hexdigest()
    assert shown["image_sha256"] == sha and shown["analysed"]
    body = {"image_sha256": sha, "reviewer": "Dr. Lin", "verdicts": {"Pneumothorax": "present", "Foreign body":
            "absent"}, "comment": "apical"}  # fmt: skip
    saved = client.post("/v1/reviews", json=body).json()["review"]
    assert saved["verdicts"] == {"Pneumothorax": "present", "Foreign body": "absent"} and saved["comment"] == "apical"
    assert saved["model_sha256"] == service.card["checkpoint_sha256"] and saved["image_name"] == "film.png"
    for label, v in shown["labels"].items():  # the server's own record of what it showed, not the client's
        assert saved["shown"][label] == {k: v[k] for k in ("probability", "threshold", "rule", "present", "calibrated")}
    assert (tmp_path / "kept" / f"{sha}.png").read_bytes() == png and saved["image_path"].endswith(f"{sha}.png")
    fixed = client.post("/v1/reviews", json={**body, "verdicts": {"Pneumothorax": "unsure"}, "supersedes": saved["id"]})
    assert fixed.status_code == 200 and fixed.json()["review"]["supersedes"] == saved["id"]
    listed = client.get("/v1/reviews").json()["reviews"]
    assert [r["id"] for r in listed] == [saved["id"], saved["id"] + 1]
    after = client.get("/v1/reviews", params={"since": saved["created_at"]}).json()["reviews"]
    assert [r["id"] for r in after] == [saved["id"] + 1]
    # what the store holds is exactly these two reviews
    assert [(r["reviewer"], r["verdicts"]) for r in service.reviews.list()] == [
        ("Dr. Lin", {"Pneumothorax": "present", "Foreign body": "absent"}),
        ("Dr. Lin", {"Pneumothorax": "unsure"}),
    ]


@pytest.mark.parametrize(
    "change, status, words",
    [
        ({"image_sha256": "0" * 64}, 409, "not predicted by this server"),
        ({"verdicts": {"Atelectasis": "present"}}, 422, "unknown labels"),
        ({"verdicts": {"Pneumothorax": "maybe"}}, 422, "verdicts"),
        ({"reviewer": ""}, 422, "reviewer's name"),
        ({"supersedes": 12345}, 422, "no review 12345"),
        ({"reviewer": "x" * 10_000}, 422, "body.reviewer: String should have at most 128 characters"),
        ({"comment": "c" * 4001}, 422, "body.comment: String should have at most 4000 characters"),
        ({"comment": "c" * 2_000_000}, 413, "review body larger than 64 KB"),
        ({"comment": "a\x00b"}, 422, "comment: control character U+0000"),
        (
            {"verdicts": {f"label {i}": "absent" for i in range(65)}},
            422,
            "body.verdicts: Dictionary should have at most",
        ),
    ],
)
def test_a_bad_review_gets_its_status_and_reason(reviewing, demo_data, change, status, words):
    client, service = reviewing
    png = sorted((demo_data / "images").glob("test_*.png"))[1].read_bytes()
    sha = client.post("/v1/predict", files={"file": ("f.png", png, "image/png")}).json()["image_sha256"]
    body = {"image_sha256": sha, "reviewer": "Dr. Lin", "verdicts": {"Pneumothorax": "absent"}, **change}
    answer = client.post("/v1/reviews", json=body)
    assert answer.status_code == status and words in answer.json()["error"]["message"]
    assert service.reviews.list() == []


def test_reviews_are_off_without_a_store(tiny_clip_checkpoint):
    from fastapi.testclient import TestClient

    from cxrclip.serve.app import ServeSettings, Service, create_app

    settings = ServeSettings(model=PredictorOptions(str(tiny_clip_checkpoint)))
    client = TestClient(create_app(settings, Service(settings)))
    answer = client.get("/v1/reviews")
    assert answer.status_code == 503 and "--db" in answer.json()["error"]["message"]


def test_an_older_database_is_migrated_and_keeps_its_reviews(tmp_path):
    from alembic import command

    from cxrclip.migrate import alembic_config
    from cxrclip.reviews.store import MIGRATIONS

    path = tmp_path / "reviews.sqlite"
    store = ReviewStore(path)
    saved = review(store)
    config = alembic_config(MIGRATIONS)
    with store.engine.begin() as conn:  # back to the first schema, as an older cxrclip left it
        config.attributes["connection"] = conn
        command.downgrade(config, "0001_reviews")
    store.close()
    again = ReviewStore(path)
    assert again.revision == head_revision() == "0005_model_changes"
    assert again.list() == [saved]
    from sqlalchemy import text

    with pytest.raises(Exception, match="append-only"), again.engine.begin() as conn:  # the triggers survived
        conn.execute(text("UPDATE cxrclip_reviews SET reviewer = 'someone else'"))
    again.log_prediction("ab" * 32, "cd" * 32, "default", {"analysed": True, "gate": {"score": 0.1},
                         "labels": {"Pneumothorax": {"probability": 0.7, "present": True}}})  # fmt: skip
    (logged,) = again.predictions()
    assert logged["labels"] == {"Pneumothorax": [0.7, True]} and logged["gate_score"] == 0.1 and logged["analysed"]


def at(day: int, hour: int = 9) -> str:
    return datetime.datetime(2026, 11, day, hour, tzinfo=datetime.timezone.utc).isoformat()


def test_the_monitor_flags_the_day_a_labels_yes_share_leaves_its_band_and_only_that_day():
    from cxrclip.reviews.monitor import expected_band, monitor_report
    from cxrclip.scoring.intervals import wilson

    stream = []
    for day in range(1, 7):  # 40 images a day; 4 YES (10 %, the validation prevalence) — then day 6: 24 YES (60 %)
        yes = 24 if day == 6 else 4
        for i in range(40):
            calls = {"Pneumothorax": [0.9 if i < yes else 0.1, i < yes], "Foreign body": [0.1, False]}
            score = 0.05 if day < 6 else 0.2
            stream.append({"created_at": at(day, 8 + i % 10), "analysed": True, "gate_score": score, "labels": calls})
    stream.append({"created_at": at(6), "analysed": False, "gate_score": 0.97, "labels": {}})
    report = monitor_report(stream, [], ["Pneumothorax", "Foreign body"], {"Pneumothorax": 0.1, "Foreign body": None})
    ptx = report["labels"]["Pneumothorax"]
    assert ptx["flagged"] == ["2026-11-06"]
    assert [p["share"] for p in ptx["series"]] == [0.1] * 5 + [0.6]
    assert ptx["series"][0]["mean_probability"] == round((4 * 0.9 + 36 * 0.1) / 40, 4)
    low, high = expected_band(0.1, 40)
    assert ptx["series"][0]["band"] == [round(low, 4), round(high, 4)]
    assert high == pytest.approx(0.1 + 1.959964 * (0.1 * 0.9 / 40) ** 0.5)
    assert (
        report["labels"]["Foreign body"]["flagged"] == []
        and "band" not in report["labels"]["Foreign body"]["series"][0]
    )
    assert report["intake"][-1] == {"period": "2026-11-06", "images": 41, "refused": 1,
                                    "mean_gate_score": round((40 * 0.2 + 0.97) / 41, 4)}  # fmt: skip
    weekly = monitor_report(stream, [], ["Pneumothorax"], {"Pneumothorax": 0.1}, period="week")
    assert weekly["periods"] == ["2026-W44", "2026-W45"]  # Sunday 1 November 2026 ends ISO week 44
    # Wilson 95 % against its formula at one point (k = 3 of 10)
    lo, hi = wilson(3, 10)
    assert lo == pytest.approx(0.1078, abs=1e-4) and hi == pytest.approx(0.6032, abs=1e-4)


def test_agreement_counts_the_calls_against_the_verdicts():
    from cxrclip.reviews.monitor import agreement

    def one(called: bool, verdict: str) -> dict:
        return {"shown": {"Pneumothorax": {"present": called}}, "verdicts": {"Pneumothorax": verdict}}

    reviews = [one(True, "present")] * 3 + [one(True, "absent")] + [one(False, "present")] + [one(False, "absent")] * 5
    reviews += [one(True, "unsure")]  # left out
    a = agreement(reviews, "Pneumothorax")
    assert (a["tp"], a["fp"], a["fn"], a["tn"], a["reviewed"]) == (3, 1, 1, 5, 10)
    assert a["sensitivity"]["value"] == 0.75 and a["ppv"]["value"] == 0.75
    assert agreement([], "Pneumothorax")["sensitivity"] is None


def test_in_chromium_a_reviewer_works_the_queue_corrects_two_labels_with_the_keyboard_and_sees_it_in_the_monitor(
    tiny_clip_checkpoint, demo_data, tmp_path
):
    import shutil

    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get)")
    playwright = pytest.importorskip("playwright.sync_api")
    from cxrclip.serve.app import ServeSettings, Service, create_app
    from tests.servers import CHROMIUM_ARGS, live_app

    db = tmp_path / "reviews.sqlite"
    settings = ServeSettings(model=PredictorOptions(str(tiny_clip_checkpoint)), db=str(db))
    with live_app(create_app(settings, Service(settings))) as url:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) or
                           r.request.url.startswith("data:") else r.abort())  # fmt: skip
                page.goto(url + "/", timeout=30_000)
                films = sorted((demo_data / "images").glob("test_*.png"))[:2]
                page.set_input_files("#file", str(films[1]))  # shown, then left: it waits in the queue
                page.locator("#queue-list li").first.wait_for(timeout=60_000)
                page.set_input_files("#file", str(films[0]))
                queue = page.locator("#queue-list li")
                queue.nth(1).wait_for(timeout=60_000)  # both films wait, with why (the finding nearest its threshold)
                assert {queue.nth(i).locator("strong").inner_text() for i in range(2)} == {f.name for f in films}
                assert "from its threshold" in queue.first.inner_text()
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "review-queue.png"), full_page=True)
                rows = page.locator("#labels tbody tr")
                rows.nth(12).wait_for(timeout=60_000)
                first, second = rows.nth(0).get_attribute("data-label"), rows.nth(1).get_attribute("data-label")
                page.fill("#reviewer", "Dr. Lin")
                rows.nth(0).focus()
                page.keyboard.press("p")
                page.keyboard.press("ArrowDown")
                page.keyboard.press("a")
                page.keyboard.press("Enter")
                page.locator("#review-status", has_text="saved").wait_for(timeout=30_000)
                assert rows.nth(0).locator(".verdict").inner_text() == "present"
                page.locator("#queue-list li").nth(1).wait_for(state="detached", timeout=30_000)
                assert page.locator("#queue-list li strong").all_inner_texts() == [films[1].name]  # reviewed: gone
                page.goto(url + "/monitor", timeout=30_000)
                row = page.locator(f'#agreement tbody tr[data-label="{first}"]')
                row.wait_for(timeout=30_000)
                assert row.locator("td").nth(1).inner_text() == "1"  # one reviewed case for this finding
                assert "1 reviews" in page.inner_text("#model") and page.locator("#charts figure").count() == 13
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "monitor-page.png"), full_page=True)
            finally:
                browser.close()
    (saved,) = ReviewStore(db).list()  # the SQLite file holds exactly that review
    assert saved["reviewer"] == "Dr. Lin" and saved["verdicts"] == {first: "present", second: "absent"}


def test_export_writes_csvs_that_validate_data_accepts(reviewing, demo_data, tmp_path, capsys):
    import csv
    import hashlib
    import json

    from cxrclip.cli import main as cli_main

    client, service = reviewing
    films = sorted((demo_data / "images").glob("test_*.png"))[:3]
    shas = []
    for film in films:
        png = film.read_bytes()
        assert client.post("/v1/predict", files={"file": (film.name, png, "image/png")}).status_code == 200
        shas.append(hashlib.sha256(png).hexdigest())
    post = lambda **b: client.post("/v1/reviews", json={"reviewer": "Dr. Lin", **b}).json()["review"]  # noqa: E731
    first = post(image_sha256=shas[0], verdicts={"Pneumothorax": "present", "Foreign body": "absent"})
    post(image_sha256=shas[0], verdicts={"Pneumothorax": "absent", "Foreign body": "absent"}, supersedes=first["id"])
    post(image_sha256=shas[1], verdicts={"Pneumothorax": "unsure", "Chest tube in place": "present"})
    out = tmp_path / "export"
    assert cli_main(["reviews", "export", "--db", service.settings.db, "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "reviewed_test.csv").open()))
    assert len(rows) == 2  # two images reviewed; the correction replaced the first review
    assert rows[0]["Pneumothorax"] == "0" and rows[0]["Foreign body"] == "0" and rows[0]["Chest tube in place"] == ""
    assert rows[1]["Pneumothorax"] == "" and rows[1]["Chest tube in place"] == "1"
    assert "chest tube" in rows[1]["text"].lower()
    summary = json.loads((out / "export.json").read_text())
    assert (summary["reviews"], summary["corrected"], summary["images"], summary["images_kept"]) == (3, 1, 2, 2)
    capsys.readouterr()
    assert cli_main(["validate-data", str(out / "reviewed_test.csv"), "--split", "test", "--blank-labels",
                     "excluded"]) == 0  # fmt: skip
    assert cli_main(["validate-data", str(out / "reviewed_train.csv"), "--split", "train"]) == 0
    train = list(csv.DictReader((out / "reviewed_train.csv").open()))
    assert [ast.literal_eval(r["text_label"]) for r in train] == [[], ["Chest tube in place"]]


def test_a_site_calibration_is_stored_beside_the_models_own_selected_and_reported(
    tiny_clip_checkpoint, demo_data, tmp_path
):
    import shutil as sh

    import torch

    from cxrclip.cli import main as cli_main
    from cxrclip.predict import load_predictor
    from cxrclip.scoring.calibration import Calibration

    ckpt = tmp_path / "model.tar"
    sh.copy(tiny_clip_checkpoint, ckpt)
    before = torch.load(ckpt, weights_only=False, map_location="cpu").get("calibration")
    args = ["calibrate", "--checkpoint", str(ckpt), "--data", str(demo_data / "test.csv"), "--split", "cls",
            "--min-positives", "1", "--site", "hannover", "--device", "cpu"]  # fmt: skip
    assert cli_main(args) == 0
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert state.get("calibration") == before  # the model's own calibration is untouched
    site = state["site_calibrations"]["hannover"]
    assert site["fitted_on"]["site"] == "hannover" and site["fitted_on"]["rows"] == 12

    default = load_predictor(ckpt, device="cpu")
    local = load_predictor(ckpt, device="cpu", site="hannover")
    assert local.calibration.to_dict() == Calibration.from_dict(site).for_labels(local.label_names).to_dict()
    film = sorted((demo_data / "images").glob("test_*.png"))[0]
    a, b = default.predict([film])[0].to_json(), local.predict([film])[0].to_json()
    assert a["calibration"] == "default" and b["calibration"] == "hannover"
    assert {n: v["threshold"] for n, v in b["labels"].items()} == {
        n: round(float(t), 4) for n, t in zip(local.label_names, local.calibration.thresholds)
    }
    card = local.card()
    assert card["calibration"] == "hannover" and card["sites"] == ["hannover"]
    with pytest.raises(InputError, match="no calibration for that site \\(sites: hannover\\)"):
        load_predictor(ckpt, device="cpu", site="taipei")
    # a bundle exported afterwards carries it
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "bundle")]) == 0
    bundled = load_predictor(tmp_path / "bundle", site="hannover")
    assert bundled.calibration.to_dict() == local.calibration.to_dict() and bundled.sites() == ["hannover"]


def test_a_label_the_site_cannot_calibrate_keeps_the_models_own_calibration():
    import numpy as np

    from cxrclip.scoring.calibration import CalibrationSettings, fit_calibration

    rng = np.random.default_rng(0)
    names = ["Pneumothorax", "Foreign body"]
    logits = rng.normal(size=(200, 2))
    labels = (logits + rng.normal(scale=0.5, size=(200, 2)) > 0).astype(int)
    model_own = fit_calibration(logits, labels, names, CalibrationSettings())
    site_labels = labels[:12].copy()
    site_labels[:, 1] = 0  # the site reviewed no positive "Foreign body"
    site = fit_calibration(logits[:12] + 0.5, site_labels, names, CalibrationSettings(min_positives=2, min_negatives=2))
    merged = site.over(model_own)
    assert merged.labels["Pneumothorax"] == site.labels["Pneumothorax"] and site.labels["Pneumothorax"].calibrated
    kept = merged.labels["Foreign body"]
    assert not site.labels["Foreign body"].calibrated and kept.calibrated
    assert (kept.method, kept.params, kept.threshold) == (model_own.labels["Foreign body"].method,
            model_own.labels["Foreign body"].params, model_own.labels["Foreign body"].threshold)  # fmt: skip
    assert kept.note.startswith("the model's own calibration kept")


def test_a_readers_own_token_signs_the_review_with_their_name(tiny_clip_checkpoint, demo_data, tmp_path):
    import hashlib

    from fastapi.testclient import TestClient

    from cxrclip.cli import _read_users
    from cxrclip.serve.app import ServeSettings, Service, create_app

    users = tmp_path / "users.json"
    users.write_text('{"Dr. Lin": "lin-0123456789abcdef", "Dr. Wu": "wu-0123456789abcdef0"}')
    settings = ServeSettings(model=PredictorOptions(str(tiny_clip_checkpoint)), db=str(tmp_path / "r.sqlite"),
                             users=_read_users(str(users)))  # fmt: skip
    client = TestClient(create_app(settings, Service(settings)))
    assert client.get("/v1/model").status_code == 401
    wu = {"Authorization": "Bearer wu-0123456789abcdef0"}
    assert client.get("/v1/model", headers=wu).json()["user"] == "Dr. Wu"
    png = sorted((demo_data / "images").glob("test_*.png"))[0].read_bytes()
    assert client.post("/v1/predict", files={"file": ("f.png", png, "image/png")}, headers=wu).status_code == 200
    body = {
        "image_sha256": hashlib.sha256(png).hexdigest(),
        "reviewer": "Dr. Lin",
        "verdicts": {"Pneumothorax": "absent"},
    }
    saved = client.post("/v1/reviews", json=body, headers=wu).json()["review"]
    assert saved["reviewer"] == "Dr. Wu"  # the token's reader, not the name typed in the body
    for bad, words in (('{"a": "short"}', "at least 16"), ('{"a": "0123456789abcdefX", "b": "0123456789abcdefX"}',
                       "share a token"), ("[1]", "expected")):  # fmt: skip
        users.write_text(bad)
        with pytest.raises(ConfigError, match=words):
            _read_users(str(users))


def test_a_shadow_challenger_answers_silently_and_the_monitor_compares_it(tiny_clip_checkpoint, demo_data, tmp_path):
    """--shadow: the challenger's answer is logged with its own hash, never in the API's answer; /v1/monitor compares
    the two per label (agreement, YES shares, each against the reviewers)."""
    import hashlib

    from fastapi.testclient import TestClient

    from cxrclip.serve.app import ServeSettings, Service, create_app
    from tests.models import challenger_checkpoint

    challenger = challenger_checkpoint(tiny_clip_checkpoint, tmp_path / "challenger.tar")
    db = tmp_path / "reviews.sqlite"
    model = PredictorOptions(str(tiny_clip_checkpoint), device="cpu")
    plain = TestClient(create_app(s := ServeSettings(model=model, db=str(tmp_path / "plain.sqlite")), Service(s)))
    settings = ServeSettings(model=model, db=str(db), shadow=str(challenger))
    service = Service(settings)
    client = TestClient(create_app(settings, service))
    films = sorted((demo_data / "images").glob("test_*.png"))[:6]
    for film in films:
        png = film.read_bytes()
        answer = client.post("/v1/predict", files={"file": (film.name, png, "image/png")}).json()
        alone = plain.post("/v1/predict", files={"file": (film.name, png, "image/png")}).json()
        for timed in (answer, alone):
            timed.pop("request_id"), timed.pop("seconds")
        assert answer == alone  # the shadow changes nothing anyone sees
    sha = hashlib.sha256(films[0].read_bytes()).hexdigest()
    client.post(
        "/v1/reviews", json={"image_sha256": sha, "reviewer": "Dr. Lin", "verdicts": {"Pneumothorax": "present"}}
    )
    answers, shadows = service.reviews.predictions(), service.reviews.predictions(role="shadow")
    assert len(answers) == len(shadows) == 6
    assert {r["model_sha256"] for r in shadows} == {hashlib.sha256(challenger.read_bytes()).hexdigest()}
    assert {r["model_sha256"] for r in answers} == {service.card["checkpoint_sha256"]}
    report = client.get("/v1/monitor").json()
    assert report["predictions"] == 6  # the monitor's own figures count the answers, not the shadow's
    pneumothorax = report["shadow"]["labels"]["Pneumothorax"]
    champion = {r["image_sha256"]: r["labels"]["Pneumothorax"][1] for r in answers}
    silent = {r["image_sha256"]: r["labels"]["Pneumothorax"][1] for r in shadows}
    agree = sum(champion[s] == silent[s] for s in champion)
    assert pneumothorax["images"] == 6 and pneumothorax["agree"] == agree
    assert (
        pneumothorax["reviewed"] == 1
        and pneumothorax["champion_agrees_with_reviewers"]["value"] == float(champion[sha])
        and pneumothorax["challenger_agrees_with_reviewers"]["value"] == float(silent[sha])
    )
    assert "shadow" not in plain.get("/v1/monitor").json()

    # the review queue: unreviewed images, those a review would teach most first (a brute-force reference)
    queue = client.get("/v1/review-queue").json()["images"]
    shown = {h: service.desk._recent[h]["shown"] for h in service.desk._recent}
    silent_calls = {r["image_sha256"]: {n: v[1] for n, v in r["labels"].items()} for r in shadows}
    expected = []
    for h, labels in shown.items():
        if h == sha:  # reviewed above
            continue
        margin = min(abs(v["probability"] - v["threshold"]) for v in labels.values())
        disagree = sum(bool(silent_calls[h][n]) != bool(v["present"]) for n, v in labels.items())
        expected.append((round(disagree + 1 - min(margin / 0.5, 1), 4), h))
    assert [(q["score"], q["image_sha256"]) for q in queue] == sorted(expected, key=lambda e: (-e[0], e[1]))
    assert sha not in {q["image_sha256"] for q in queue} and len(queue) == 5
