#!/usr/bin/env python3
"""Checks the release Package.swift (ios/release-package.sh's output): exactly one binary target,
`VeilFFIFFI`, downloaded by `url:` (https, .zip) with a 64-hex `checksum:` and no `path:`; and
everything else (tools version, name, platforms, products, targets, paths, dependencies, linker
settings) the same as ios/Package.swift, the manifest developers build from source with. Runs on
Linux: no Swift needed.

  python3 ios/check-release.py               # render the template with a dummy URL and checksum, check it
  python3 ios/check-release.py --self-test   # also proves the checks fail on broken inputs
                                             # (--verbose: what each broken input got)
  python3 ios/check-release.py --manifest ios/dist/Package.swift [--zip ios/dist/VeilFFIFFI.xcframework.zip]
                                             # check a real one; with --zip also that its checksum is
                                             # the zip's SHA-256 and the one in ZIP.sha256
Exit status 1 and a list of problems when something is off.
"""
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REFERENCE = ROOT / "Package.swift"
TEMPLATE = ROOT / "Package.release.swift.in"
RENDER = ROOT / "release-package.sh"
BINARY = "VeilFFIFFI"
DUMMY_URL = "https://example.invalid/veil/releases/download/0.0.0/VeilFFIFFI.xcframework.zip"
DUMMY_CHECKSUM = hashlib.sha256(b"not a real XCFramework").hexdigest()
HEX64 = re.compile(r"[0-9a-f]{64}")


def code_only(src: str) -> str:
    """The source without comments, with whitespace outside string literals removed but for one
    space between two words (a `//` inside a string, as in the URL, stays), and trailing commas
    before `]`/`)` dropped."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append(src[i:j + 1])
            i = j + 1
        elif src.startswith("//", i):
            i = src.find("\n", i) if "\n" in src[i:] else n
        elif src.startswith("/*", i):
            end = src.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c.isspace():
            j = i
            while j < n and src[j].isspace():
                j += 1
            # One space where it separates two words (`let package`), none elsewhere.
            if out and (out[-1][-1:].isalnum() or out[-1][-1:] == "_") and j < n \
                    and (src[j].isalnum() or src[j] == "_"):
                out.append(" ")
            i = j
        else:
            out.append(c)
            i += 1
    return re.sub(r",(?=[\])])", "", "".join(out))


def balanced(src: str, open_at: int) -> int:
    """Index just past the bracket closing the one at `open_at` (strings skipped)."""
    depth, i = 0, open_at
    while i < len(src):
        c = src[i]
        if c == '"':
            i = src.index('"', i + 1)
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced brackets")


def split_top(args: str):
    """Top-level comma-separated parts of an argument or array list (code_only text)."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(args):
        c = args[i]
        if c == '"':
            j = args.index('"', i + 1)
            cur += args[i:j + 1]
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    if cur:
        parts.append(cur)
    return parts


def labelled(args: str):
    """[(label, value)] of a call's arguments."""
    out = []
    for part in split_top(args):
        m = re.match(r"(\w+):(.*)$", part, re.S)
        out.append((m.group(1), m.group(2)) if m else ("", part))
    return out


def binary_targets(code: str):
    """[(start, end, [(label, value)])] of every .binaryTarget( call."""
    found = []
    for m in re.finditer(r"\.binaryTarget\(", code):
        end = balanced(code, m.end() - 1)
        found.append((m.start(), end, labelled(code[m.end():end - 1])))
    return found


def array_arg(code: str, label: str):
    """The elements of the top-level `label: [...]` argument, and the code with it cut out."""
    m = re.search(re.escape(label) + r":\[", code)
    if not m:
        return None, code
    end = balanced(code, m.end() - 1)
    return split_top(code[m.end():end - 1]), code[:m.start()] + label + ":[…]" + code[end:]


def target_name(entry: str) -> str:
    m = re.search(r'name:"([^"]*)"', entry)
    return m.group(1) if m else entry


def tools_version(src: str) -> str:
    first = src.split("\n", 1)[0].strip()
    return first if re.fullmatch(r"//\s*swift-tools-version:\s*\S+", first) else ""


def check_manifest(release: str, reference: str, expect_url=None, expect_checksum=None):
    problems = []
    left = re.findall(r"@VEIL_[A-Z_]*@", release)
    if left:
        problems.append(f"unfilled template placeholders: {sorted(set(left))}")
    if not tools_version(release):
        problems.append("the first line is not `// swift-tools-version:…` (SwiftPM requires it first)")
    elif tools_version(release).replace(" ", "") != tools_version(reference).replace(" ", ""):
        problems.append(f"tools version `{tools_version(release)}` differs from ios/Package.swift's "
                        f"`{tools_version(reference)}`")

    rel, ref = code_only(release), code_only(reference)
    rel_bins, ref_bins = binary_targets(rel), binary_targets(ref)
    if len(rel_bins) != 1:
        problems.append(f"{len(rel_bins)} .binaryTarget entries, want exactly one")
    for _, _, args in rel_bins:
        labels = [k for k, _ in args]
        values = {k: v for k, v in args}
        if labels != ["name", "url", "checksum"]:
            problems.append(f".binaryTarget({', '.join(l + ':' for l in labels)}) — want "
                            "(name:, url:, checksum:) and no path: (a path binary target needs "
                            "the XCFramework on disk)")
        if values.get("name") != f'"{BINARY}"':
            problems.append(f"binary target name {values.get('name')}, want \"{BINARY}\"")
        url = values.get("url", "")
        if not re.fullmatch(r'"https://[^/"\s]+/[^"\s]*\.zip"', url):
            problems.append(f"url {url or '(none)'}: want a quoted https:// URL ending in .zip")
        elif expect_url is not None and url != f'"{expect_url}"':
            problems.append(f"url {url}, want \"{expect_url}\"")
        checksum = values.get("checksum", "")
        if not re.fullmatch(r'"[0-9a-f]{64}"', checksum):
            problems.append(f"checksum {checksum or '(none)'}: want 64 lowercase hex digits in quotes")
        elif expect_checksum is not None and checksum != f'"{expect_checksum}"':
            problems.append(f"checksum {checksum}, want \"{expect_checksum}\"")
    if len(ref_bins) != 1:
        problems.append(f"ios/Package.swift has {len(ref_bins)} .binaryTarget entries, want one")
    if problems:
        return problems

    # Everything but the binary target must be ios/Package.swift's.
    def without_binary(code, bins):
        start, end, _ = bins[0]
        return code[:start] + ".binaryTarget(<" + BINARY + ">)" + code[end:]

    rel, ref = without_binary(rel, rel_bins), without_binary(ref, ref_bins)
    rel_products, rel_rest = array_arg(rel, "products")
    ref_products, ref_rest = array_arg(ref, "products")
    rel_targets, rel_rest = array_arg(rel_rest, "targets")
    ref_targets, ref_rest = array_arg(ref_rest, "targets")
    if rel_products is None or rel_targets is None:
        problems.append("no `products: [...]` or `targets: [...]` in the release manifest")
        return problems
    if rel_products != ref_products:
        problems.append(f"products differ: release {rel_products}, ios/Package.swift {ref_products}")
    rel_by = {target_name(t): t for t in rel_targets}
    ref_by = {target_name(t): t for t in ref_targets}
    for name in ref_by.keys() - rel_by.keys():
        problems.append(f"target {name} is missing from the release manifest")
    for name in rel_by.keys() - ref_by.keys():
        problems.append(f"target {name} is not in ios/Package.swift")
    for name in rel_by.keys() & ref_by.keys():
        if rel_by[name] != ref_by[name]:
            problems.append(f"target {name} differs: release `{rel_by[name]}`, "
                            f"ios/Package.swift `{ref_by[name]}`")
    if not problems and [target_name(t) for t in rel_targets] != [target_name(t) for t in ref_targets]:
        problems.append("targets are in a different order from ios/Package.swift's")
    if rel_rest != ref_rest:
        problems.append(f"the manifest differs outside products/targets (name, platforms, …): "
                        f"release `{rel_rest}`, ios/Package.swift `{ref_rest}`")
    return problems


def render(url, checksum, out: Path, template=TEMPLATE, env_url=None):
    """Runs ios/release-package.sh; returns (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VEIL_XCFRAMEWORK_URL", "VEIL_XCFRAMEWORK_CHECKSUM")}
    if env_url is not None:
        env["VEIL_XCFRAMEWORK_URL"] = env_url
    cmd = ["bash", str(RENDER), "--out", str(out), "--template", str(template)]
    if url is not None:
        cmd += ["--url", url]
    if checksum is not None:
        cmd += ["--checksum", checksum]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return p.returncode, p.stderr.strip()


def self_test(good: str, reference: str, tmp: Path, verbose=False) -> int:
    failures, refused = 0, 0

    def expect_rejected(what, url, checksum, template=TEMPLATE, env_url=None, must_say=None):
        nonlocal failures, refused
        refused += 1
        out = tmp / "rejected.swift"
        out.unlink(missing_ok=True)
        rc, err = render(url, checksum, out, template, env_url)
        if rc == 0 or out.exists():
            print(f"self-test FAILED: release-package.sh accepted {what}")
            failures += 1
        elif rc != 2 or not err.startswith("release-package.sh: "):
            print(f"self-test FAILED: release-package.sh failed on {what} without its message "
                  f"(exit {rc}): {err}")
            failures += 1
        elif must_say and must_say not in err:
            print(f"self-test FAILED: rejecting {what}, the message does not name {must_say}: {err}")
            failures += 1
        elif verbose:
            print(f"  refused {what}: {err}")

    expect_rejected("no URL (VEIL_XCFRAMEWORK_URL unset)", None, DUMMY_CHECKSUM,
                    must_say="VEIL_XCFRAMEWORK_URL")
    expect_rejected("an empty VEIL_XCFRAMEWORK_URL", None, DUMMY_CHECKSUM, env_url="",
                    must_say="VEIL_XCFRAMEWORK_URL")
    expect_rejected("an http:// URL", DUMMY_URL.replace("https:", "http:"), DUMMY_CHECKSUM)
    expect_rejected("a URL not ending in .zip", DUMMY_URL[:-4] + ".tar.gz", DUMMY_CHECKSUM)
    expect_rejected("a URL with a quote", DUMMY_URL.replace("veil/", 'veil"/'), DUMMY_CHECKSUM)
    expect_rejected("a URL with a space", DUMMY_URL.replace("veil/", "veil /"), DUMMY_CHECKSUM)
    expect_rejected("no checksum", DUMMY_URL, None)
    expect_rejected("a 63-digit checksum", DUMMY_URL, DUMMY_CHECKSUM[:63])
    expect_rejected("a 65-digit checksum", DUMMY_URL, DUMMY_CHECKSUM + "0")
    expect_rejected("a non-hex checksum", DUMMY_URL, "g" + DUMMY_CHECKSUM[1:])
    expect_rejected("an upper-case checksum", DUMMY_URL, DUMMY_CHECKSUM.upper())
    template = TEMPLATE.read_text()
    broken = tmp / "broken.swift.in"
    broken.write_text(template.replace("@VEIL_XCFRAMEWORK_CHECKSUM@", "0" * 64))
    expect_rejected("a template without the checksum placeholder", DUMMY_URL, DUMMY_CHECKSUM, broken)
    broken.write_text(template + "// @VEIL_XCFRAMEWORK_URL@\n")
    expect_rejected("a template with the URL placeholder twice", DUMMY_URL, DUMMY_CHECKSUM, broken)
    broken.write_text(template.replace("name: \"Veil\",", "name: \"@VEIL_NAME@\","))
    expect_rejected("a template with an unknown placeholder", DUMMY_URL, DUMMY_CHECKSUM, broken)

    # The env variable is honoured when --url is not given.
    out = tmp / "from-env.swift"
    rc, err = render(None, DUMMY_CHECKSUM, out, env_url=DUMMY_URL)
    if rc != 0 or check_manifest(out.read_text(), reference, DUMMY_URL, DUMMY_CHECKSUM):
        print(f"self-test FAILED: VEIL_XCFRAMEWORK_URL was not used: {err}")
        failures += 1

    path_target = f'.binaryTarget(name: "{BINARY}", path: "VeilFFIFFI.xcframework"),'
    mutations = [
        ("the url binary target replaced by a path one",
         lambda s: re.sub(r"\.binaryTarget\(.*?\n        \),", path_target, s, flags=re.S)),
        ("a second, path binary target", lambda s: s.replace("\n    targets: [", "\n    targets: [\n" + path_target)),
        ("path: added to the url binary target", lambda s: s.replace('checksum: "', 'path: "x", checksum: "')),
        ("no checksum", lambda s: re.sub(r',\s*checksum: "[0-9a-f]*"', "", s)),
        ("a 63-digit checksum", lambda s: s.replace(DUMMY_CHECKSUM, DUMMY_CHECKSUM[:63])),
        ("a non-hex checksum", lambda s: s.replace(DUMMY_CHECKSUM, "z" * 64)),
        ("an http URL", lambda s: s.replace(DUMMY_URL, DUMMY_URL.replace("https:", "http:"))),
        ("a different URL than asked for", lambda s: s.replace("0.0.0", "9.9.9")),
        ("a placeholder left", lambda s: s.replace(DUMMY_CHECKSUM, "@VEIL_XCFRAMEWORK_CHECKSUM@")),
        ("a target's path changed", lambda s: s.replace('path: "Sources/Veil"', 'path: "Sources/Wrapper"')),
        ("a dependency changed", lambda s: s.replace('dependencies: ["VeilFFIFFI"]', 'dependencies: []')),
        ("a linker setting dropped", lambda s: s.replace(', .linkedFramework("MetalPerformanceShaders")', "")),
        ("a product renamed", lambda s: s.replace('.library(name: "Veil"', '.library(name: "VeilKit"')),
        ("a product added", lambda s: s.replace("products: [", 'products: [\n        .library(name: "VeilFFI", targets: ["VeilFFI"]),')),
        ("a target dropped", lambda s: re.sub(r'\n\s*\.target\(name: "Veil".*?\n', "\n", s)),
        ("an extra target", lambda s: s.replace("\n    targets: [", '\n    targets: [\n        .target(name: "Extra", path: "Sources/Extra"),')),
        ("a platform lowered", lambda s: s.replace(".iOS(.v16)", ".iOS(.v15)")),
        ("the package renamed", lambda s: s.replace('name: "Veil",\n    platforms', 'name: "VeilRelease",\n    platforms')),
        ("the tools version changed", lambda s: s.replace("swift-tools-version:5.9", "swift-tools-version:5.3")),
        ("the tools-version line not first", lambda s: "// Veil\n" + s),
    ]
    for what, mutate in mutations:
        bad = mutate(good)
        if bad == good:
            print(f"self-test FAILED: the mutation '{what}' did not apply (the test is stale)")
            failures += 1
        else:
            found = check_manifest(bad, reference, DUMMY_URL, DUMMY_CHECKSUM)
            if not found:
                print(f"self-test FAILED: {what} went unnoticed")
                failures += 1
            elif verbose:
                print(f"  caught {what}: {found[0]}")
    if failures == 0:
        print(f"self-test: release-package.sh refused all {refused} broken inputs; all {len(mutations)} "
              "broken manifests were caught")
    return 1 if failures else 0


def check_zip(manifest: str, zip_path: Path):
    problems = []
    m = re.search(r'checksum:\s*"([0-9a-f]{64})"', manifest)
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()
    if not m or m.group(1) != digest:
        problems.append(f"the manifest's checksum is not {zip_path.name}'s SHA-256 ({digest})")
    sidecar = zip_path.with_name(zip_path.name + ".sha256")
    if sidecar.exists():
        recorded = sidecar.read_text().split()
        if not recorded or recorded[0] != digest:
            problems.append(f"{sidecar.name} holds {recorded[:1]}, not the zip's SHA-256 {digest}")
    return problems


def main() -> int:
    args = sys.argv[1:]
    for flag in ("--manifest", "--zip"):
        if flag in args and args.index(flag) + 1 >= len(args):
            print(f"{flag} needs a file")
            return 2
    reference = REFERENCE.read_text()
    if "--manifest" in args:
        manifest_path = Path(args[args.index("--manifest") + 1])
        manifest = manifest_path.read_text()
        problems = check_manifest(manifest, reference)
        if "--zip" in args:
            problems += check_zip(manifest, Path(args[args.index("--zip") + 1]))
        for p in problems:
            print(f"{manifest_path}: {p}")
        if not problems:
            print(f"{manifest_path}: one url + checksum binary target; the rest matches ios/Package.swift")
        return 1 if problems else 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = tmp / "Package.swift"
        rc, err = render(DUMMY_URL, DUMMY_CHECKSUM, out)
        if rc != 0:
            print(f"release-package.sh failed on valid input: {err}")
            return 1
        good = out.read_text()
        problems = check_manifest(good, reference, DUMMY_URL, DUMMY_CHECKSUM)
        for p in problems:
            print(f"release manifest (ios/Package.release.swift.in): {p}")
        if problems:
            return 1
        print("release manifest: one url + checksum binary target; the rest matches ios/Package.swift")
        if "--self-test" in args:
            return self_test(good, reference, tmp, verbose="--verbose" in args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
