"""``harness doctor``: rows, fixes, where the R scripts were found, exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import doctor, versions
from harness._resources import RScriptsMissingError, r_scripts_dir


def test_a_wrong_override_falls_back_to_the_installed_scripts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HARNESS_R_SCRIPTS", "/nonexistent")
    row = doctor.check_r_scripts()
    # The override is wrong, but the installed/repository copy is still found.
    assert row["ok"], row
    assert "HARNESS_R_SCRIPTS" not in row["detail"]


def test_missing_r_scripts_is_a_failing_row_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import _resources

    monkeypatch.setattr(_resources, "_candidates", lambda: [("nowhere", _resources.Path("/x"))])
    with pytest.raises(RScriptsMissingError, match="/x"):
        r_scripts_dir()
    row = doctor.check_r_scripts()
    assert not row["ok"]
    assert "HARNESS_R_SCRIPTS" in row["fix"]


def test_rscript_versions_without_rscript_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(versions.shutil, "which", lambda name: None)
    assert versions.rscript_versions() is None


def test_doctor_ok_ignores_optional_rows() -> None:
    rows = [
        {"piece": "a", "ok": True, "required": True},
        {"piece": "blas", "ok": False, "required": False},
    ]
    assert doctor.doctor_ok(rows)
    rows.append({"piece": "lme4", "ok": False, "required": True})
    assert not doctor.doctor_ok(rows)


@pytest.mark.r
def test_rscript_versions_reads_the_versions_script() -> None:
    found = versions.rscript_versions(check_load=True)
    if found is None:
        pytest.skip("Rscript not available")
    assert found["R"].startswith("4.")
    assert found["lme4"] is not None


@pytest.mark.r
def test_doctor_command_passes_on_a_complete_machine() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "doctor"], capture_output=True, text=True, timeout=300
    )
    rows = doctor.doctor()
    assert (done.returncode == 0) == doctor.doctor_ok(rows), done.stdout + done.stderr
    assert "r_scripts/" in done.stdout
    for row in rows:
        if not row["ok"]:
            assert row["fix"], row
