"""What a model says about itself wherever it answers — the server's ``GET /v1/model``, the PACS worker's DICOM SR:
name, checkpoint hash, encoders, preprocessing, labels, operating points, gate, and the disclaimer. Each predictor
answers :meth:`card` with this, after its own ``identity()`` (name, hash, and what only its kind has)."""

from __future__ import annotations

DISCLAIMER = "Research software, not a medical device: not for diagnostic use."


def model_card(predictor) -> dict:
    """The card of any predictor (checkpoint, bundle, routed): its identity, then what every predictor has."""
    calibration = predictor.calibration
    return {
        **predictor.identity(),
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
