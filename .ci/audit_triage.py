"""Judge pip-audit's JSON reports against the triage file (run by .ci/audit.sh).

    python .ci/audit_triage.py TRIAGE_FILE NAME=REPORT.json[:LOG] ...

Each REPORT is ``pip-audit -f json`` output for one dependency set (NAME), LOG its
stderr. Exit status:

- 0: every finding is triaged (the triage file names its id or an alias, for its package),
  including when some dependencies could not be checked (pip-audit failed, e.g. no
  network, or the service had no data for a package): a WARNING names each of them;
- 1: a finding is not triaged (whatever could not be checked besides);
- 2: bad arguments or a malformed triage file;
- 3: something could not be checked and PIP_AUDIT_STRICT=1 (for a CI that reaches the
  service, where "no data" means the audit did not happen).

Triage entries that match no finding of a complete audit are listed (the vulnerability
may be fixed or the pin moved): a note, not a failure.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    vuln_id: str
    package: str
    reason: str
    line: int


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_triage(path: Path) -> list[Entry]:
    """``ID PACKAGE REASON...`` per line; ``#`` starts a comment line."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            raise ValueError(f"{path}:{number}: expected 'ID PACKAGE REASON', got {line!r}")
        entries.append(Entry(parts[0], canonical(parts[1]), parts[2].strip(), number))
    return entries


def judge(triage: list[Entry], reports: dict[str, tuple[Path, Path | None]], strict: bool) -> int:
    untriaged, used = [], set()
    unaudited: dict[str, list[str]] = {}  # "<set>: <reason>" -> the packages it left unchecked
    for name, (report, log) in reports.items():
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log and log.is_file() else []
            unaudited[f"{name}: pip-audit produced no report: {' | '.join(tail) or 'no output'}"] = []
            continue
        for dep in data.get("dependencies", []):
            if "skip_reason" in dep:
                # "...could not be audited: numpy (2.4.6)": the package goes in the list, so
                # that one line holds every package skipped for the same reason
                reason = re.sub(r":\s*[^\s:]+ \([^()]*\)$", "", dep["skip_reason"])
                unaudited.setdefault(f"{name}: {reason}", []).append(f"{dep['name']} {dep.get('version', '')}".strip())
                continue
            for vuln in dep.get("vulns", []):
                ids = {vuln["id"], *vuln.get("aliases", [])}
                match = next((e for e in triage if e.package == canonical(dep["name"]) and e.vuln_id in ids), None)
                fixes = ", ".join(vuln.get("fix_versions") or []) or "none"
                what = f"{name}: {dep['name']} {dep['version']} {vuln['id']} ({', '.join(sorted(ids - {vuln['id']}))}; fixed in {fixes})"
                if match is None:
                    untriaged.append(what)
                else:
                    used.add(match)
                    print(f"triaged  {what}: {match.reason}")
    if not unaudited:  # offline, nothing could match
        for entry in triage:
            if entry not in used:
                print(f"note: triage line {entry.line} ({entry.vuln_id} {entry.package}) matched no finding")
    if unaudited:
        # Every one is named: a dependency missing from this list was checked.
        print("\nWARNING: COULD NOT AUDIT these dependencies (is the vulnerability service reachable, does it "
              "know them?); they were NOT checked for vulnerabilities:")
        print("\n".join(f"  {why} ({len(names)}): {', '.join(names)}" if names else f"  {why}: every package of the set"
                        for why, names in unaudited.items()))
    if untriaged:
        print("\nNOT TRIAGED (upgrade the pin if a patch/minor release fixes it, else add 'ID PACKAGE REASON' "
              "to security/pip-audit-ignore.txt):")
        print("\n".join(f"  {u}" for u in untriaged))
        return 1
    if unaudited:
        if strict:
            print("PIP_AUDIT_STRICT=1: failing, since the audit could not check everything")
            return 3
        print("pip-audit: no untriaged vulnerabilities among what could be checked; not failing "
              "(PIP_AUDIT_STRICT=1 makes dependencies that could not be checked fail the audit)")
        return 0
    print("pip-audit: no untriaged vulnerabilities")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all("=" in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        triage = read_triage(Path(argv[0]))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reports = {}
    for arg in argv[1:]:
        name, _, paths = arg.partition("=")
        report, _, log = paths.partition(":")
        reports[name] = (Path(report), Path(log) if log else None)
    return judge(triage, reports, os.environ.get("PIP_AUDIT_STRICT") == "1")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
