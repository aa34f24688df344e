#!/usr/bin/env python3
"""No Swift compiler runs on our Linux CI, so this checks by name what the compiler would:
every call the Swift wrapper (Sources/Veil) and the demo app make into the generated bindings
(Sources/VeilFFI/*.swift: veil-ffi's and veil-core's) or into the wrapper names a declared function or initializer with
matching argument labels (defaulted ones may be left out), every `VeilError.X` case exists, and
every wrapper method that implements a generated protocol requirement has its exact signature.

  python3 ios/check-api.py            # exit 1 and a list of mismatches when something is off
  python3 ios/check-api.py --self-test  # also proves the check fails on broken sources
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GENERATED = sorted((ROOT / "Sources/VeilFFI").glob("*.swift"))  # VeilFFI.swift, VeilCore.swift
WRAPPER = sorted((ROOT / "Sources/Veil").glob("*.swift"))
DEMO = sorted((ROOT / "VeilDemo").glob("*.swift"))

DECL = re.compile(r"\b(?:(?:public|open|private|internal|fileprivate|convenience|override|static|final|nonisolated)\s+)*"
                  r"(func\s+(\w+)|init)\s*(?:<[^>]*>)?\s*\(")
TYPE = re.compile(r"\b(?:struct|class|protocol|enum|actor)\s+(\w+)")
CALL = re.compile(r"(?<![\w.])(\.)?\b([A-Za-z_]\w*)\s*\(|\.([a-z_]\w*)\s*\(")
KEYWORDS = {"if", "guard", "while", "for", "switch", "return", "catch", "func", "init", "map",
            "print", "format", "String", "Double", "Int", "UInt32", "UInt64", "Data", "Task",
            "UIImage", "Image", "Text", "TextField", "SecureField", "Button", "Section", "Form",
            "VStack", "ForEach", "ProgressView", "NavigationStack", "WindowGroup", "UUID",
            "withTaskCancellationHandler", "makeStream", "reduce", "remove", "append", "url",
            "finish", "yield", "value", "font", "caption", "monospaced", "onDelete", "resizable",
            "interpolation", "scaledToFit", "navigationTitle", "defer", "localizedDescription",
            "detached", "AsyncStream", "Bundle", "RunningGeneration", "GenerationProgress",
            "ClosureListener", "callback"}


def strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", " ", src)


def balanced(src: str, open_at: int) -> str:
    """The text inside the parentheses opening at `open_at`."""
    depth = 0
    for i in range(open_at, len(src)):
        c = src[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return src[open_at + 1:i]
    raise ValueError("unbalanced parentheses")


def split_top(args: str):
    out, depth, cur, quote = [], 0, "", False
    for c in args:
        if c == '"':
            quote = not quote
        if not quote:
            if c in "([{<":
                depth += 1
            elif c in ")]}>":
                depth -= 1
            elif c == "," and depth == 0:
                out.append(cur.strip())
                cur = ""
                continue
        cur += c
    if cur.strip():
        out.append(cur.strip())
    return out


def declarations(src: str):
    """name -> list of (signature text, [(label, has_default)]); init is keyed by its type."""
    src = strip_comments(src)
    decls, bodies = {}, []
    for t in TYPE.finditer(src):
        brace = src.find("{", t.end())
        if brace >= 0:
            bodies.append((brace, brace + len(balanced(src, brace)) + 1, t.group(1)))
    for m in DECL.finditer(src):
        name = m.group(2)
        if name is None:
            # An initializer belongs to the innermost type whose body holds it.
            owner = [(a, t) for a, b, t in bodies if a < m.start() < b]
            if not owner:
                continue
            name = max(owner)[1]
        params = []
        for p in split_top(balanced(src, m.end() - 1)):
            head = p.split(":")[0].split()
            if not head:
                continue
            params.append((head[0], "=" in p))
        sig = re.sub(r"\s+", " ", src[m.start():m.end() - 1] + "(" + balanced(src, m.end() - 1) + ")")
        decls.setdefault(name, []).append((sig, params))
    return decls


def call_labels(args: str):
    labels = []
    for a in split_top(args):
        m = re.match(r"^([A-Za-z_]\w*)\s*:(?!:)", a)
        labels.append(m.group(1) if m else "_")
    return labels


def matches(labels, params) -> bool:
    i = 0
    for label, has_default in params:
        if i < len(labels) and labels[i] == label:
            i += 1
        elif not has_default:
            return False
    return i == len(labels)


def check(generated: str, wrapper_files, demo_files) -> list:
    gen = declarations(generated)
    wrapper_src = {f: f.read_text() for f in wrapper_files}
    demo_src = {f: f.read_text() for f in demo_files}
    known = dict(gen)
    for src in list(wrapper_src.values()) + list(demo_src.values()):
        for k, v in declarations(src).items():
            known.setdefault(k, []).extend(v)
    at = generated.find("enum VeilError")
    body = balanced(generated, generated.find("{", at)) if at >= 0 else ""
    cases = set(re.findall(r"^\s*case\s+(\w+)", body, flags=re.M))
    problems, calls = [], 0
    for path, raw in list(wrapper_src.items()) + list(demo_src.items()):
        src = strip_comments(raw)
        own = {m.end() - 1 for m in DECL.finditer(src)}
        for m in CALL.finditer(src):
            name = m.group(2) or m.group(3)
            open_at = m.end() - 1
            if open_at in own or name in KEYWORDS or name not in known:
                continue
            labels = call_labels(balanced(src, open_at))
            calls += 1
            if not any(matches(labels, p) for _, p in known[name]):
                want = "; ".join(s for s, _ in known[name])
                problems.append(f"{path.name}: {name}({', '.join(l + ':' for l in labels)}) matches no declaration: {want}")
        for case in re.findall(r"VeilError\.(\w+)", src):
            if case not in cases:
                problems.append(f"{path.name}: VeilError.{case} is not a generated case ({sorted(cases)})")
    # Protocol requirements the wrapper implements: same signature, word for word.
    protocols = {}
    for m in re.finditer(r"public protocol (\w+)\s*:[^{]*\{(.*?)\n\}", strip_comments(generated), flags=re.S):
        for f in re.finditer(r"func\s+(\w+)\s*(\([^)]*\))\s*(async)?\s*(throws)?\s*(->\s*[\w?\[\]]+)?", m.group(2)):
            protocols.setdefault(m.group(1), {})[f.group(1)] = re.sub(r"\s+", " ", f.group(0)).strip()
    for path, raw in wrapper_src.items():
        src = strip_comments(raw)
        for m in re.finditer(r"class\s+\w+\s*:\s*([^{]*)\{", src):
            for proto in [p.strip().split()[-1] for p in m.group(1).split(",")]:
                for fname, sig in protocols.get(proto, {}).items():
                    impl = re.search(r"func\s+" + fname + r"\s*\([^)]*\)[^{]*", src[m.end():])
                    got = re.sub(r"\s+", " ", impl.group(0)).strip() if impl else None
                    if got != sig:
                        problems.append(f"{path.name}: {proto}.{fname} implemented as `{got}`, generated `{sig}`")
                    calls += 1
    if calls < 8:
        problems.append(f"only {calls} calls into the bindings found: the parser is broken")
    return problems, calls


def main() -> int:
    generated = "\n".join(f.read_text() for f in GENERATED)
    problems, calls = check(generated, WRAPPER, DEMO)
    if "--self-test" in sys.argv and not problems:
        import tempfile
        broken = [("listener: listener", "progressListener: listener"),
                  ("func onProgress(step: UInt32, total: UInt32, preview: StepPreview?)",
                   "func onProgress(step: UInt32, total: UInt32)"),
                  ("previewEverySteps: previewEverySteps.map", "previewEvery: previewEverySteps.map"),
                  ("allowResearchPolicies: allowResearchPolicies,", "allowResearch: allowResearchPolicies,"),
                  ("VeilError.Cancelled", "VeilError.cancelled"),
                  ("VeilClient(config: config)", "VeilClient(configuration: config)")]
        for old, new in broken:
            with tempfile.TemporaryDirectory() as d:
                files = []
                for f in WRAPPER + DEMO:
                    p = Path(d) / f.name
                    p.write_text(f.read_text().replace(old, new))
                    files.append(p)
                bad, _ = check(generated, files[:len(WRAPPER)], files[len(WRAPPER):])
                if problems or len(bad) <= len(problems):
                    print(f"self-test FAILED: replacing `{old}` with `{new}` went unnoticed")
                    return 1
        print(f"self-test: all {len(broken)} injected mismatches detected")
    for p in problems:
        print("mismatch:", p)
    if problems:
        return 1
    print(f"Swift wrapper and demo match the generated bindings ({calls} calls and conformances checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
