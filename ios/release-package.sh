#!/usr/bin/env bash
# Writes the release Package.swift: ios/Package.release.swift.in with the URL and the SwiftPM
# checksum of VeilFFIFFI.xcframework.zip substituted, so apps add Veil by URL without building
# Rust. ios/build-xcframework.sh runs it after zipping; it runs anywhere (bash + awk; CI runs it
# on Linux through python3 ios/check-release.py --self-test).
#
#   ios/release-package.sh --url URL --checksum HEX [--out FILE] [--template FILE]
#
#   --url       the full https URL the zip is downloaded from, ending in .zip
#               (default: $VEIL_XCFRAMEWORK_URL), e.g.
#               https://github.com/ORG/veil/releases/download/0.1.0/VeilFFIFFI.xcframework.zip
#   --checksum  `swift package compute-checksum VeilFFIFFI.xcframework.zip`: 64 lowercase hex
#               digits, the zip's SHA-256 (default: $VEIL_XCFRAMEWORK_CHECKSUM)
#   --out       where to write it (default ios/dist/Package.swift); "-" for stdout
#   --template  the template (default ios/Package.release.swift.in)
#
# Exits 2 with a message, writing nothing, on a missing or malformed value or template.
# Written for macOS's bash 3.2 too.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

url=${VEIL_XCFRAMEWORK_URL:-}
checksum=${VEIL_XCFRAMEWORK_CHECKSUM:-}
out=$here/dist/Package.swift
template=$here/Package.release.swift.in

die() { echo "release-package.sh: $*" >&2; exit 2; }
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --url) [ $# -ge 2 ] || die "--url needs a value"; url=$2; shift 2 ;;
        --checksum) [ $# -ge 2 ] || die "--checksum needs a value"; checksum=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a value"; out=$2; shift 2 ;;
        --template) [ $# -ge 2 ] || die "--template needs a value"; template=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[ -n "$url" ] || die "no URL for the binary target: pass --url or set VEIL_XCFRAMEWORK_URL to the full https URL of VeilFFIFFI.xcframework.zip (e.g. https://github.com/ORG/veil/releases/download/0.1.0/VeilFFIFFI.xcframework.zip)"
# SwiftPM accepts only https URLs whose path ends in .zip; the URL goes into a Swift string
# literal, so no quotes, backslashes or whitespace.
case $url in
    https://*) ;;
    *) die "the URL must start with https:// (SwiftPM refuses other schemes): '$url'" ;;
esac
case $url in
    *.zip) ;;
    *) die "the URL must end in .zip (the zipped XCFramework): '$url'" ;;
esac
if printf '%s' "$url" | LC_ALL=C grep -q '["\\[:space:][:cntrl:]]'; then
    die "the URL must not contain quotes, backslashes, whitespace or control characters: '$url'"
fi
printf '%s' "$url" | LC_ALL=C grep -Eq '^https://[^/]+/.+[.]zip$' || die "the URL needs a host and a path to the zip: '$url'"

[ -n "$checksum" ] || die "no checksum: pass --checksum with the output of 'swift package compute-checksum VeilFFIFFI.xcframework.zip'"
if ! printf '%s' "$checksum" | LC_ALL=C grep -Eqx '[0-9a-f]{64}'; then
    die "the checksum must be 64 lowercase hex digits (swift package compute-checksum's output), got '$checksum'"
fi

[ -f "$template" ] || die "no template at $template"
for placeholder in @VEIL_XCFRAMEWORK_URL@ @VEIL_XCFRAMEWORK_CHECKSUM@; do
    n=$({ grep -o "$placeholder" "$template" || true; } | wc -l | tr -d ' ')
    [ "$n" = 1 ] || die "$template must hold $placeholder exactly once (found $n)"
done

# Literal substitution (awk's index/substr: no regex or '&' surprises in the URL).
rendered=$(awk -v url="$url" -v sum="$checksum" '
    function rep(s, pat, val,    i, r) {
        r = ""
        while ((i = index(s, pat)) > 0) { r = r substr(s, 1, i - 1) val; s = substr(s, i + length(pat)) }
        return r s
    }
    { print rep(rep($0, "@VEIL_XCFRAMEWORK_URL@", url), "@VEIL_XCFRAMEWORK_CHECKSUM@", sum) }
' "$template")
if printf '%s\n' "$rendered" | grep -q '@VEIL_[A-Z_]*@'; then
    die "$template holds a placeholder this script does not fill: $(printf '%s\n' "$rendered" | grep -o '@VEIL_[A-Z_]*@' | head -1)"
fi

if [ "$out" = - ]; then
    printf '%s\n' "$rendered"
else
    mkdir -p "$(dirname "$out")"
    tmp="$out.tmp.$$"
    printf '%s\n' "$rendered" > "$tmp"
    mv "$tmp" "$out"
    echo "wrote $out (url $url, checksum $checksum)" >&2
fi
