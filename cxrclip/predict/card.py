"""What a model says about itself wherever it answers — the server's ``GET /v1/model``, the PACS worker's DICOM SR:
name, checkpoint hash, encoders, preprocessing, labels, operating points, gate, and the disclaimer."""

from __future__ import annotations

from pathlib import Path

from cxrclip.io import file_sha256

DISCLAIMER = "Research software, not a medical device: not for diagnostic use."


def model_card(predictor, path: str) -> dict:
    """What ``GET /v1/model`` says: name, checkpoint hash, labels, operating points, image size."""

    calibration = predictor.calibration
    bundle = getattr(predictor, "bundle", None)
    routed = predictor.card() if hasattr(predictor, "card") else None
    if routed:
        digest = file_sha256(Path(path) / "routed.json")
    else:
        digest = bundle.manifest["card"]["checkpoint_sha256"] if bundle else file_sha256(path)
    return {
        "name": Path(path).name,
        "checkpoint_sha256": digest,
        **({"routing": routed} if routed else {}),
        **({"bundle_sha256": file_sha256(bundle.path / "bundle.json"), "backend": predictor.backend} if bundle else {}),
        **predictor.encoders,
        "image_size": predictor.preprocess.size,
        "precision": predictor.precision,
        "preprocess": predictor.preprocess.to_dict(),
        "labels": predictor.label_names,
        "operating_points": {
            n: {"threshold": c.threshold, "rule": c.rule, "calibrated": c.calibrated, "method": c.method}
            for n, c in calibration.labels.items()
        },
        "calibrated_on": calibration.fitted_on or None,
        "calibration": predictor.calibration_name,  # "default", or the site whose calibration answers
        "sites": predictor.sites(),
        "gate": predictor.gate.describe(),
        "disclaimer": DISCLAIMER,
    }
