"""The DICOM validators a radiologist's archive is judged by: dicom3tools' dciodvfy and PixelMed's (Debian
libpixelmed-java) SR and IOD validators, run on a written file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PIXELMED = Path("/usr/share/java/pixelmed.jar")
# Java 17's XPath limits are below what PixelMed's template rules need
JAVA = ["java", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0"]
# PixelMed's IOD rules for the Segmentation contradict the standard (and dciodvfy) in exactly these places: it wants
# the Derivation Image Sequence in both the shared and the per-frame functional groups (then refuses it in both), and
# General Series Laterality whatever the body part (dciodvfy refuses it for a chest, which is not paired).
PIXELMED_SEG_FALSE_ERRORS = (
    "Error: GeneralSeriesModule/Laterality/: : Missing conditional attribute",
    "Error: DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence/Item[1]/: Missing required "
    "sequence attribute (Type 2)",
)


def need(reason: str | None) -> None:
    """A missing tool is a skip with its reason, and a failure where .ci/run installed it (CXRCLIP_REQUIRE_SERVERS)."""
    if reason:
        (pytest.fail if os.environ.get("CXRCLIP_REQUIRE_SERVERS") else pytest.skip)(reason)


def _save(ds, folder: Path) -> Path:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(ds, folder: Path) -> list[str]:
    need(None if shutil.which("dciodvfy") else "Debian's dicom3tools (dciodvfy) is not installed")
    done = subprocess.run(["dciodvfy", str(_save(ds, folder))], capture_output=True, text=True, timeout=120)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def pixelmed(ds, folder: Path, validator: str) -> list[str]:
    """PixelMed's findings (errors and warnings) on ``ds``; ``validator``: DicomSRValidator (the templates) or
    DicomInstanceValidator (the IOD)."""
    need(None if PIXELMED.is_file() and shutil.which("java") else "Debian's libpixelmed-java is not installed")
    done = subprocess.run([*JAVA, "-cp", str(PIXELMED), f"com.pixelmed.validate.{validator}", str(_save(ds, folder))],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = (done.stdout + done.stderr).splitlines()
    assert any("validation complete" in line.lower() for line in lines), "\n".join(lines[-20:])
    return [line for line in lines if line.startswith(("Error", "Warning")) or "not in template" in line]


def pixelmed_sr_findings(ds, folder: Path) -> list[str]:
    """Errors, warnings and "not in template" items of PixelMed's SR validator (templates and the IOD)."""
    return pixelmed(ds, folder, "DicomSRValidator")


def pixelmed_iod_errors(ds, folder: Path) -> list[str]:
    """PixelMed's IOD errors, less its known contradictions of the standard for a Segmentation."""
    found = [x for x in pixelmed(ds, folder, "DicomInstanceValidator") if x.startswith("Error")]
    if getattr(ds, "Modality", "") == "SEG":
        found = [x for x in found if x not in PIXELMED_SEG_FALSE_ERRORS]
    return found
