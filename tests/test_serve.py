"""``cxrclip serve``: every endpoint and each bad upload through FastAPI's TestClient, the safety defaults, the
heatmaps, and the page in a real (Debian) Chromium that must not request anything outside the machine."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrclip.predict import PredictorOptions
from tests.servers import CHROMIUM_ARGS, live_app

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")
pytest.importorskip("fastapi")
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def service(tiny_clip_checkpoint):
    from cxrclip.serve.app import ServeSettings, Service

    return Service(ServeSettings(model=PredictorOptions(str(tiny_clip_checkpoint)), max_upload_mb=1.0))


def client_for(service, **settings):
    from fastapi.testclient import TestClient

    from cxrclip.serve.app import ServeSettings, create_app

    merged = {"model": service.settings.model, "max_upload_mb": 1.0, **settings}
    return TestClient(create_app(ServeSettings(**merged), service))


@pytest.fixture(scope="module")
def client(service):
    return client_for(service)


def demo_png(demo_data) -> bytes:
    return sorted((demo_data / "images").glob("test_*.png"))[0].read_bytes()


def dicom_bytes(tmp_path, **attrs) -> bytes:
    from tests.test_images import write_dicom

    return write_dicom(tmp_path / "x.dcm", (np.arange(64 * 64).reshape(64, 64) * 3) % 4096, **attrs).read_bytes()


def test_health_model_and_docs(client, tiny_clip_checkpoint):
    from cxrclip.io import file_sha256

    assert client.get("/healthz").json() == {"status": "ok"}
    card = client.get("/v1/model").json()
    assert card["checkpoint_sha256"] == file_sha256(tiny_clip_checkpoint) and len(card["labels"]) == 13
    assert card["image_size"] == 32 and set(card["operating_points"]) == set(card["labels"])
    assert "not for diagnostic use" in card["disclaimer"]
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_predict_returns_what_inference_json_returns(client, service, demo_data, capsys):
    from tests.test_eval import infer_json

    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    response = client.post("/v1/predict", files={"file": ("a.png", image.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"] and len(body["request_id"]) == 32
    assert body["input"]["format"] == "PNG" and body["preview"].startswith("data:image/png;base64,")
    infer_json(service.settings.model.model_path, image)
    cli = json.loads(capsys.readouterr().out)
    assert body["labels"] == cli["labels"] and body["ranking"] == cli["ranking"]
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_dicom_heatmap_and_free_text(client, tmp_path):
    data = dicom_bytes(tmp_path, PhotometricInterpretation="MONOCHROME1")
    response = client.post(
        "/v1/predict",
        files={"file": ("x.dcm", data, "application/dicom")},
        data={"heatmap": "Pneumothorax", "texts": ["there is pneumothorax.", "no pneumothorax."]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"]["format"] == "DICOM" and body["input"]["photometric_interpretation"] == "MONOCHROME1"
    assert any("MONOCHROME1" in w for w in body["input"]["warnings"])
    assert body["heatmap"]["label"] == "Pneumothorax" and body["heatmap"]["png"].startswith("data:image/png")
    assert [t["text"] for t in body["texts"]] == ["there is pneumothorax.", "no pneumothorax."]
    assert sum(t["probability"] for t in body["texts"]) == pytest.approx(1.0, abs=1e-3)


def test_batch_keeps_going_past_a_bad_file(client, demo_data):
    files = [("files", ("a.png", demo_png(demo_data), "image/png")), ("files", ("b.txt", b"hello", "text/plain"))]
    results = client.post("/v1/predict/batch", files=files).json()["results"]
    assert "labels" in results[0] and results[1]["error"]["status"] == 415


@pytest.mark.parametrize(
    "name, payload, status, message",
    [
        ("notes.png", b"just text, named .png", 415, "not a PNG, JPEG or DICOM"),
        ("cut.png", None, 422, "cannot decode image"),
        ("empty.png", b"", 422, "empty file"),
        ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (1024 * 1024 + 10), 413, "larger than 1 MB"),
    ],
)
def test_bad_uploads_get_clear_status_codes(client, demo_data, name, payload, status, message):
    if payload is None:
        payload = demo_png(demo_data)[:80]
    response = client.post("/v1/predict", files={"file": (name, payload, "image/png")})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_a_dicom_without_pixels_and_an_unknown_heatmap_label(client, tmp_path, demo_data):
    import pydicom

    data = dicom_bytes(tmp_path)
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    response = client.post("/v1/predict", files={"file": ("np.dcm", buffer.getvalue(), "application/dicom")})
    assert response.status_code == 422 and "no pixel data" in response.json()["error"]["message"]
    response = client.post("/v1/predict", files={"file": ("a.png", demo_png(demo_data))}, data={"heatmap": "Nope"})
    assert response.status_code == 422 and "unknown label" in response.json()["error"]["message"]
    assert client.post("/v1/predict").status_code == 422  # no file at all


def test_uploads_up_to_the_cap_stay_in_memory(client):
    """Starlette spools a part over 1 MB to a temporary file; the server's own parser keeps an accepted upload (the
    cap of these tests' server is 1 MB) in memory — set on its parser, Starlette's class is left as it is."""
    import asyncio

    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    from cxrclip.serve.deps import InMemoryParser

    boundary = "cxrclipboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    body = head.encode() + b"\0" * (1024 * 1024 + 10) + f"\r\n--{boundary}--\r\n".encode()

    async def in_memory(parser_class, spool: int | None) -> bool:
        async def stream():
            yield body

        parser = parser_class(Headers({"content-type": f"multipart/form-data; boundary={boundary}"}), stream())
        if spool:
            parser.spool_max_size = spool
        return (await parser.parse())["file"]._in_memory

    assert asyncio.run(in_memory(InMemoryParser, client.app.state.runtime.settings.max_bytes + (1 << 20)))
    assert not asyncio.run(in_memory(MultiPartParser, None))  # what Starlette alone would do: spooled to disk
    assert MultiPartParser.spool_max_size == 1024 * 1024  # no global patch


def test_decompression_bombs_are_refused(client):
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")  # 400 Mpixel, a few hundred kB compressed
    response = client.post("/v1/predict", files={"file": ("bomb.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 422 and "decompression bomb" in response.json()["error"]["message"].lower()


def test_token_and_binding_rules(service, demo_data):
    from cxrclip.exceptions import ConfigError
    from cxrclip.serve.app import ServeSettings

    secured = client_for(service, token="s3cret")
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/v1/model").status_code == 401
    assert secured.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert secured.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with pytest.raises(ConfigError, match="--token"):
        ServeSettings(model=PredictorOptions("x"), host="0.0.0.0").check()
    ServeSettings(model=PredictorOptions("x"), host="0.0.0.0", token="t").check()
    ServeSettings(model=PredictorOptions("x"), host="0.0.0.0", insecure=True).check()
    plain = client_for(service).get("/v1/model", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in plain.headers  # no CORS unless asked


def test_inference_cli_writes_heatmaps(tiny_clip_checkpoint, demo_data, tmp_path):
    from cxrclip.infer import main

    image = sorted((demo_data / "images").glob("test_*.png"))[0]
    argv = ["--model_path", str(tiny_clip_checkpoint), "--image_path", str(image), "--heatmap", str(tmp_path)]
    assert main([*argv, "--heatmap-label", "Pneumothorax", "--heatmap-label", "Foreign body"]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == [f"{image.stem}.Foreign_body.png", f"{image.stem}.Pneumothorax.png"]
    assert Image.open(tmp_path / written[0]).size == (32, 32)


class IntensityEncoder(torch.nn.Module):
    """A known encoder: its feature map is the image itself (8×8 average-pooled), its feature the mean."""

    out_dim = 3

    def cam_features(self, images):
        fmap = torch.nn.functional.avg_pool2d(images, 8)
        return fmap, fmap.mean(dim=(2, 3)), lambda x: x

    def forward(self, images):
        return self.cam_features(images)[1]


def test_grad_cam_finds_what_drives_the_score_on_a_known_model():
    from cxrclip.model.clip import CXRClip
    from cxrclip.predict.gradcam import grad_cam

    text = torch.nn.Linear(1, 3)
    text.out_dim = 3
    model = CXRClip(IntensityEncoder(), text, None).eval()
    image = torch.ones(1, 3, 64, 64)
    image[:, 0] = 0.0
    image[:, 0, :16, 40:56] = 2.0  # channel 0 is bright in one patch only; the target direction is channel 0
    cam = grad_cam(model, image, torch.tensor([1.0, 0.0, 0.0]), 10.0)
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0)
    assert cam[:16, 40:56].mean() > 0.5 and cam[32:, :32].max() == 0.0


@pytest.mark.parametrize("preset", ["resnet", "timm", "swin"])
def test_every_encoder_exposes_a_feature_map_consistent_with_its_forward(preset):
    from cxrclip.model.clip import CXRClip
    from cxrclip.model.encoders import HuggingfaceImageEncoder, TimmImageEncoder, TorchvisionResNet
    from cxrclip.predict.gradcam import grad_cam

    torch.manual_seed(0)
    if preset == "resnet":
        encoder = TorchvisionResNet("resnet18", pretrained=False)
    elif preset == "timm":
        encoder = TimmImageEncoder("efficientnet_lite0", pretrained=False)
    else:
        from transformers import SwinConfig, SwinModel

        encoder = HuggingfaceImageEncoder.__new__(HuggingfaceImageEncoder)
        torch.nn.Module.__init__(encoder)
        encoder.pooling = "first"
        encoder.image_encoder = SwinModel(SwinConfig(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[2, 2]))
        encoder.out_dim = encoder.image_encoder.config.hidden_size
    encoder.eval()
    images = torch.randn(2, 3, 64, 64)
    activations, pooled, to_map = encoder.cam_features(images)
    grid = to_map(activations)
    assert grid.ndim == 4 and grid.shape[0] == 2 and grid.shape[2] == grid.shape[3] >= 2
    torch.testing.assert_close(pooled, encoder(images))
    text = torch.nn.Linear(1, 1)
    text.out_dim = 1
    model = CXRClip(encoder, text, {"name": "linear", "proj_dim": 8}).eval()
    cam = grad_cam(model, images[:1], torch.randn(8), 10.0)
    assert cam.shape == (64, 64) and np.isfinite(cam).all() and 0.0 <= cam.min() <= cam.max() <= 1.0


# -- the page in a real browser --------------------------------------------------------------------------
@pytest.fixture
def live_server(service):
    from cxrclip.serve.app import ServeSettings, create_app

    with live_app(create_app(ServeSettings(model=service.settings.model), service)) as url:
        yield url


def test_the_page_in_chromium_shows_labels_a_heatmap_a_refusal_banner_and_stays_local(live_server, demo_data, tmp_path):
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get)")
    playwright = pytest.importorskip("playwright.sync_api")
    outside = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()

            def check(route):
                url = route.request.url
                if url.startswith(live_server) or url.startswith("data:"):
                    route.continue_()
                else:
                    outside.append(url)
                    route.abort()

            page.route("**/*", check)
            page.goto(live_server + "/", timeout=30_000)
            assert "not for diagnostic use" in page.inner_text("#disclaimer")
            image = sorted((demo_data / "images").glob("test_*.png"))[0]
            page.set_input_files("#file", str(image))
            page.locator("#labels tbody tr").nth(12).wait_for(timeout=60_000)  # (the page's CSP forbids eval)
            assert page.locator("#labels tbody tr").count() == 13
            page.locator("#labels tbody tr", has_text="Pneumothorax").click()
            page.locator('#heatmap[src^="data:image/png;base64,"]').wait_for(state="visible", timeout=60_000)
            assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
            page.fill("#text", "there is a pneumothorax.")
            page.click("#query button")
            page.locator("#similarity li").first.wait_for(timeout=60_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)
            # an input the gate refuses (a blank film): a banner with the reason, and no bars at all
            blank = tmp_path / "blank.png"
            Image.fromarray(np.zeros((64, 64), np.uint8)).save(blank)
            page.set_input_files("#file", str(blank))
            page.locator("#refused").wait_for(state="visible", timeout=60_000)
            assert "blank" in page.inner_text("#refused-reason")
            assert not page.locator("#results").is_visible() and not page.locator("#labels").is_visible()
            page.screenshot(path=str(ARTIFACTS / "serve-page-refused.png"), full_page=True)
        finally:
            browser.close()
    assert outside == [], f"the page requested non-local URLs: {outside}"


def test_every_answer_is_documented_and_validates_against_openapi_json(tiny_clip_checkpoint, demo_data, tmp_path):
    """/openapi.json has a schema for every 2xx answer, and real answers — analysed, refused, a batch with a bad
    file, a review, the review list, the monitor, the model, an error — validate against it."""
    import hashlib

    import jsonschema
    from fastapi.testclient import TestClient

    from cxrclip.serve.app import ServeSettings, create_app

    settings = ServeSettings(model=PredictorOptions(str(tiny_clip_checkpoint)), db=str(tmp_path / "r.sqlite"))
    client = TestClient(create_app(settings))
    spec = client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
            assert "$ref" in schema, f"{method.upper()} {path}: no schema for its answer"

    def check(method: str, path: str, response, status: int = 200) -> dict:
        assert response.status_code == status, response.text
        schema = spec["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(response.json())
        return response.json()

    png = demo_png(demo_data)
    blank = io.BytesIO()
    Image.new("L", (64, 64), 128).save(blank, format="PNG")
    check("get", "/healthz", client.get("/healthz"))
    check("get", "/v1/model", client.get("/v1/model"))
    form = {"heatmap": "Pneumothorax", "texts": ["a tube"]}
    answer = check("post", "/v1/predict", client.post("/v1/predict", files={"file": ("a.png", png)}, data=form))
    assert answer["analysed"] and answer["heatmap"]["label"] == "Pneumothorax" and answer["texts"]
    refused = check("post", "/v1/predict", client.post("/v1/predict", files={"file": ("b.png", blank.getvalue())}))
    assert not refused["analysed"] and "labels" not in refused  # no label answer, not even null
    files = [("files", ("a.png", png, "image/png")), ("files", ("x.png", b"not an image", "image/png"))]
    batch = check("post", "/v1/predict/batch", client.post("/v1/predict/batch", files=files))
    assert "labels" in batch["results"][0] and batch["results"][1]["error"]["status"] == 415
    body = {
        "image_sha256": hashlib.sha256(png).hexdigest(),
        "reviewer": "Dr. Lin",
        "verdicts": {"Pneumothorax": "absent"},
    }
    check("post", "/v1/reviews", client.post("/v1/reviews", json=body))
    assert len(check("get", "/v1/reviews", client.get("/v1/reviews"))["reviews"]) == 1
    check("get", "/v1/monitor", client.get("/v1/monitor"))
    conflict = client.post("/v1/reviews", json={**body, "image_sha256": "0" * 64})
    check("post", "/v1/reviews", conflict, 409)
