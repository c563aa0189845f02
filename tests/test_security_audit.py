"""The dependency audit's wiring and its triage rules (.ci/audit.sh, .ci/audit_triage.py),
checked offline: the triage script runs as a real process on pip-audit-shaped reports.
The audit itself needs PyPI's vulnerability service and runs from `make test`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server_utils import ROOT

TRIAGE = ROOT / "security" / "pip-audit-ignore.txt"
SCRIPT = ROOT / ".ci" / "audit_triage.py"


def triage(tmp_path: Path, reports: dict[str, dict | None], lines: str = "", strict: bool = False,
           log: str = "") -> subprocess.CompletedProcess:
    triage_file = tmp_path / "ignore.txt"
    triage_file.write_text("# comment\n" + lines)
    args = []
    for name, report in reports.items():
        path = tmp_path / f"{name}.json"
        if report is not None:
            path.write_text(json.dumps(report))
        else:  # pip-audit wrote nothing (no report from an earlier call either)
            path.unlink(missing_ok=True)
        (tmp_path / f"{name}.log").write_text(log)
        args.append(f"{name}={path}:{tmp_path / f'{name}.log'}")
    env = {**os.environ, "PIP_AUDIT_STRICT": "1" if strict else "0"}
    return subprocess.run([sys.executable, str(SCRIPT), str(triage_file), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def finding(name: str = "torch", version: str = "2.9.1", vuln: str = "PYSEC-2026-1",
            aliases: tuple[str, ...] = ("CVE-2026-1",)) -> dict:
    return {"dependencies": [{"name": "numpy", "version": "2.4.6", "vulns": []},
                             {"name": name, "version": version,
                              "vulns": [{"id": vuln, "fix_versions": ["2.10.0"], "aliases": list(aliases)}]}],
            "fixes": []}


def test_untriaged_finding_fails_naming_it(tmp_path):
    done = triage(tmp_path, {"image": finding()})
    assert done.returncode == 1
    assert "image: torch 2.9.1 PYSEC-2026-1 (CVE-2026-1; fixed in 2.10.0)" in done.stdout
    assert "security/pip-audit-ignore.txt" in done.stdout


def test_finding_triaged_by_id_or_alias_passes(tmp_path):
    for vuln_id in ("PYSEC-2026-1", "CVE-2026-1"):
        done = triage(tmp_path, {"image": finding()}, f"{vuln_id} torch not reachable: no such call\n")
        assert done.returncode == 0, done.stdout
        assert "triaged  image: torch 2.9.1" in done.stdout and "not reachable: no such call" in done.stdout


def test_triage_is_per_package(tmp_path):
    done = triage(tmp_path, {"image": finding(name="Python_Multipart")}, "CVE-2026-1 torch reason\n")
    assert done.returncode == 1
    done = triage(tmp_path, {"image": finding(name="Python_Multipart")}, "CVE-2026-1 python-multipart reason\n")
    assert done.returncode == 0


def skipped(*names: str) -> dict:
    """A report as pip-audit writes it when the service has no data for the packages."""
    return {"dependencies": [{"name": name, "skip_reason": f"Dependency not found on PyPI and could not be audited: "
                              f"{name} (1.0)"} for name in names], "fixes": []}


def test_what_could_not_be_audited_is_a_warning_naming_it_unless_strict(tmp_path):
    offline = "requests.exceptions.ConnectionError: boom"
    for reports, log, named in (({"image": skipped("torch", "numpy")}, "", "(2): torch, numpy"),
                                ({"image": None}, offline, "ConnectionError: boom")):
        done = triage(tmp_path, reports, log=log)
        assert done.returncode == 0, done.stdout
        assert "WARNING: COULD NOT AUDIT" in done.stdout and "NOT checked" in done.stdout
        assert named in done.stdout and "image: " in done.stdout
        assert "PIP_AUDIT_STRICT=1" in done.stdout  # says how to make it fail
        strict = triage(tmp_path, reports, log=log, strict=True)
        assert strict.returncode == 3 and named in strict.stdout


def test_a_real_finding_fails_even_when_other_packages_could_not_be_audited(tmp_path):
    done = triage(tmp_path, {"image": finding(), "ci-env": skipped("numpy")})
    assert done.returncode == 1
    assert "NOT TRIAGED" in done.stdout and "image: torch 2.9.1 PYSEC-2026-1" in done.stdout
    assert "ci-env: Dependency not found on PyPI and could not be audited (1): numpy" in done.stdout
    triaged = triage(tmp_path, {"image": finding(), "ci-env": skipped("numpy")},
                     "CVE-2026-1 torch not reachable here\n")
    assert triaged.returncode == 0 and "WARNING: COULD NOT AUDIT" in triaged.stdout


def test_malformed_triage_line_is_refused(tmp_path):
    done = triage(tmp_path, {"image": finding()}, "CVE-2026-1 torch\n")
    assert done.returncode == 2 and "expected 'ID PACKAGE REASON'" in done.stderr


def test_the_triage_file_gives_a_reason_per_line():
    lines = [line for line in TRIAGE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines
    for line in lines:
        vuln_id, package, reason = line.split(None, 2)
        assert re.fullmatch(r"(CVE-\d{4}-\d+|PYSEC-\d{4}-\d+|GHSA(-[0-9a-z]{4}){3})", vuln_id), line
        assert re.fullmatch(r"[A-Za-z0-9._-]+", package) and len(reason) > 20, line


def test_the_audit_runs_in_ci_over_pinned_sets():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "bash .ci/audit.sh" in recipe
    script = (ROOT / ".ci" / "audit.sh").read_text()
    assert re.search(r"PIP_AUDIT_VERSION=\d+\.\d+\.\d+", script)  # the auditor itself is pinned
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "audit.sh")]).returncode == 0
    assert ".auditenv/" in (ROOT / ".gitignore").read_text().splitlines()
    serve = (ROOT / "container" / "requirements-serve.txt").read_text().splitlines()
    pins = [line for line in serve if line.strip() and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9._-]+==[^\s;]+", p) for p in pins)
    assert re.search(r"torch==\d", (ROOT / "container" / "Dockerfile").read_text())


@pytest.mark.parametrize("name", ["requirements.txt", "pyproject.toml"])
def test_every_runtime_dependency_is_pinned_for_the_image(name):
    """requirements.txt and pyproject.toml take ranges; the image's pins must cover each
    package they name (torch through the Dockerfile), so that the audit sees them all."""
    text = (ROOT / name).read_text()
    if name == "pyproject.toml":
        text = text.split("dependencies = [", 1)[1].split("]", 1)[0].replace('"', "").replace(",", "\n")
    wanted = {re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
              for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}
    serve = (ROOT / "container" / "requirements-serve.txt").read_text()
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in serve.splitlines() if "==" in line}
    assert wanted - pinned == {"torch"}
