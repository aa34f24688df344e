#!/usr/bin/env bash
# Fails when the SDK's version is not the same everywhere a release states it:
#   Cargo.toml                  [workspace.package] version (the source of truth); core/ and
#                               bindings/ (veil-core, veil-ffi) must inherit it (version.workspace)
#   android/gradle.properties   VERSION_NAME (the Maven version), VERSION_CODE a positive integer,
#                               POM_LICENSE equal to Cargo.toml's license
#   CHANGELOG.md                the newest release heading, `## [X.Y.Z] - YYYY-MM-DD`
#   ios/Package.release.swift.in, ios/dist/Package.swift   `// Veil version X.Y.Z` (if present)
#   android/demo/build.gradle.kts                          a literal versionName (if present)
#
#   scripts/check-version.sh               # check this checkout
#   scripts/check-version.sh --root DIR    # check another tree (a copy)
#   scripts/check-version.sh --self-test   # also proves it fails on each kind of mismatch, on copies
set -euo pipefail
exec python3 - "$(cd "$(dirname "$0")/.." && pwd)" "$@" <<'PY'
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:
    tomllib = None


def toml(text: str) -> dict:
    """Cargo.toml as a dict; before Python 3.11, the few keys read here by pattern."""
    if tomllib is not None:
        return tomllib.loads(text)
    out, table = {}, None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"\[([\w.-]+)\]", line)
        if m:
            table = out
            for part in m.group(1).split("."):
                table = table.setdefault(part, {})
            continue
        m = re.fullmatch(r'([\w.-]+)\s*=\s*(?:"([^"]*)"|(true|false))', line)
        if m and table is not None:
            key, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3) == "true"
            target = table
            *parents, last = key.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[last] = value
    return out

SEMVER = re.compile(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")
FILES = ["Cargo.toml", "core/Cargo.toml", "bindings/Cargo.toml", "android/gradle.properties",
         "CHANGELOG.md", "ios/Package.release.swift.in", "ios/dist/Package.swift",
         "android/demo/build.gradle.kts"]


def properties(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def check(root: Path):
    """([(where, version)], [problem])."""
    found, problems = [], []
    cargo = toml((root / "Cargo.toml").read_text())
    package = cargo.get("workspace", {}).get("package", {})
    version = package.get("version")
    if not version:
        return found, ["Cargo.toml: no [workspace.package] version"]
    found.append(("Cargo.toml [workspace.package] version", version))
    if not SEMVER.fullmatch(version):
        problems.append(f"Cargo.toml: workspace version {version!r} is not X.Y.Z semver")

    for crate in ("core/Cargo.toml", "bindings/Cargo.toml"):
        path = root / crate
        if path.exists():
            v = toml(path.read_text()).get("package", {}).get("version")
            if v != {"workspace": True}:
                problems.append(f"{crate}: package version {v!r}; the SDK's crates take the "
                                "workspace's (version.workspace = true)")

    gradle = root / "android/gradle.properties"
    props = properties(gradle) if gradle.exists() else {}
    if "VERSION_NAME" not in props:
        problems.append("android/gradle.properties: no VERSION_NAME")
    else:
        found.append(("android/gradle.properties VERSION_NAME", props["VERSION_NAME"]))
    if "VERSION_CODE" in props and not re.fullmatch(r"[1-9]\d*", props["VERSION_CODE"]):
        problems.append(f"android/gradle.properties: VERSION_CODE {props['VERSION_CODE']!r} is not a positive integer")
    if "POM_LICENSE" in props and props["POM_LICENSE"] != package.get("license"):
        problems.append(f"android/gradle.properties: POM_LICENSE {props['POM_LICENSE']!r} is not "
                        f"Cargo.toml's license {package.get('license')!r}")

    changelog = root / "CHANGELOG.md"
    if not changelog.exists():
        problems.append("CHANGELOG.md is missing")
    else:
        heads = re.findall(r"^## \[([^\]]+)\](.*)$", changelog.read_text(), re.M)
        releases = [(v, rest) for v, rest in heads if v.strip().lower() != "unreleased"]
        if not releases:
            problems.append("CHANGELOG.md: no release heading (`## [X.Y.Z] - YYYY-MM-DD`)")
        else:
            v, rest = releases[0]
            found.append(("CHANGELOG.md newest release", v))
            if not re.fullmatch(r"\s+-\s+\d{4}-\d{2}-\d{2}.*", rest):
                problems.append(f"CHANGELOG.md: `## [{v}]{rest}` has no ` - YYYY-MM-DD` date")

    for rel in ("ios/Package.release.swift.in", "ios/dist/Package.swift"):
        path = root / rel
        if path.exists():
            m = re.search(r"^//.*\bVeil version (\S+?)[:,;]?(?:\s|$)", path.read_text(), re.M)
            if m:
                found.append((f"{rel} comment", m.group(1)))

    demo = root / "android/demo/build.gradle.kts"
    if demo.exists():
        m = re.search(r'^\s*versionName\s*=\s*"([^"]*)"', demo.read_text(), re.M)
        if m:
            found.append(("android/demo/build.gradle.kts versionName", m.group(1)))

    for where, v in found[1:]:
        if v != version:
            problems.append(f"version mismatch: {where} is {v}, Cargo.toml says {version}")
    return found, problems


def report(root: Path) -> int:
    found, problems = check(root)
    for where, v in found:
        print(f"  {v:<12} {where}")
    for p in problems:
        print(f"check-version: {p}", file=sys.stderr)
    if problems:
        print(f"check-version: FAILED ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"check-version: all {len(found)} places say {found[0][1]}")
    return 0


def self_test(root: Path) -> int:
    def sub(rel, old, new, count=1):
        def edit(copy: Path):
            path = copy / rel
            text = path.read_text()
            if old not in text:
                raise AssertionError(f"{rel} has no {old!r}: the self-test is stale")
            path.write_text(text.replace(old, new, count))
        return edit

    def delete(rel):
        return lambda copy: (copy / rel).unlink()

    def write(rel, text):
        return lambda copy: ((copy / rel).parent.mkdir(parents=True, exist_ok=True), (copy / rel).write_text(text))

    version = toml((root / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    bumped = "9.8.7"
    cases = [
        ("Cargo.toml bumped alone", sub("Cargo.toml", f'version = "{version}"', f'version = "{bumped}"')),
        ("VERSION_NAME differs", sub("android/gradle.properties", f"VERSION_NAME={version}", f"VERSION_NAME={bumped}")),
        ("no VERSION_NAME", sub("android/gradle.properties", f"VERSION_NAME={version}", "")),
        ("VERSION_CODE not a number", sub("android/gradle.properties", "VERSION_CODE=", "VERSION_CODE=x")),
        ("POM licence differs", sub("android/gradle.properties", "POM_LICENSE=Apache-2.0", "POM_LICENSE=MIT")),
        ("CHANGELOG's newest release differs", sub("CHANGELOG.md", f"## [{version}]", f"## [{bumped}]")),
        ("CHANGELOG without a release", sub("CHANGELOG.md", f"## [{version}]", f"## {version}")),
        ("CHANGELOG release without a date", sub("CHANGELOG.md", f"## [{version}] - ", f"## [{version}] ")),
        ("no CHANGELOG", delete("CHANGELOG.md")),
        ("release template comment differs", sub("ios/Package.release.swift.in", f"Veil version {version}", f"Veil version {bumped}")),
        ("a stale generated release manifest", write("ios/dist/Package.swift", f"// swift-tools-version:5.9\n// Veil version {bumped}: release\n")),
        ("the demo's versionName differs", write("android/demo/build.gradle.kts", f'android {{\n    defaultConfig {{\n        versionName = "{bumped}"\n    }}\n}}\n')),
        ("veil-ffi with its own version", sub("bindings/Cargo.toml", "version.workspace = true", f'version = "{version}"')),
        ("no workspace version", sub("Cargo.toml", f'version = "{version}"\n', "")),
    ]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        for rel in FILES:
            if (root / rel).exists():
                (base / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / rel, base / rel)
        if check(base)[1]:
            print("self-test FAILED: the unmodified copy does not pass")
            return 1
        for what, edit in cases:
            copy = Path(tmp) / "case"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(base, copy)
            edit(copy)
            problems = check(copy)[1]
            if not problems:
                print(f"self-test FAILED: {what} went unnoticed")
                failures += 1
            else:
                print(f"  caught {what}: {problems[0]}")
        # The very same check, run as a command on a broken copy, must exit non-zero.
        copy = Path(tmp) / "case"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        cases[1][1](copy)
        run = subprocess.run(["bash", str(Path(sys.argv[1]) / "scripts/check-version.sh"), "--root", str(copy)],
                             capture_output=True, text=True)
        if run.returncode != 1 or "version mismatch: android/gradle.properties VERSION_NAME" not in run.stderr:
            print(f"self-test FAILED: scripts/check-version.sh --root <broken copy> exited "
                  f"{run.returncode} without naming the mismatch: {run.stderr.strip()}")
            failures += 1
    if failures:
        return 1
    print(f"self-test: all {len(cases)} mismatches caught (on copies; the checkout is untouched)")
    return 0


def main() -> int:
    root, args = Path(sys.argv[1]), sys.argv[2:]
    if "--root" in args:
        if args.index("--root") + 1 >= len(args):
            print("--root needs a folder", file=sys.stderr)
            return 2
        root = Path(args[args.index("--root") + 1]).resolve()
    rc = report(root)
    if rc == 0 and "--self-test" in args:
        rc = self_test(root)
    return rc


sys.exit(main())
PY
