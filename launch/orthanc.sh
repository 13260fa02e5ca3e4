#!/usr/bin/env bash
# Orthanc, a real PACS with its DICOMweb plugin, from Debian's packages, installed without root into a folder.
#
#   launch/orthanc.sh install [DIR]      fetch the .debs (apt-get download: orthanc, orthanc-dicomweb and the
#                                        libraries of their dependency closure this machine lacks), unpack them
#                                        with dpkg -x into DIR/root [.runners/orthanc], check every shared
#                                        library resolves (ldd). Nothing is installed system-wide.
#   launch/orthanc.sh run CONFIG [DIR]   run Orthanc in the foreground with a JSON configuration.
#   launch/orthanc.sh start [DIR]        for users: a loopback PACS on $ORTHANC_HTTP_PORT [8042], storage in
#                                        $ORTHANC_STORAGE [DIR/storage], HTTP basic auth: user medtwin, password
#                                        from the file $ORTHANC_PASSWORD_FILE [DIR/password, generated once,
#                                        mode 600]. DICOMweb root: http://127.0.0.1:PORT/dicom-web
#
# Then, for example:
#   printf 'medtwin:%s\n' "$(cat .runners/orthanc/password)" > pacs.credentials; chmod 600 pacs.credentials
#   medtwin simulate --out h --pacs http://127.0.0.1:8042/dicom-web --pacs_credentials file:pacs.credentials
#   medtwin run --input h --output out --demo \
#       --pacs_url http://127.0.0.1:8042/dicom-web --pacs_credentials file:pacs.credentials
#
# The tests start their own Orthanc (tests/pacs_fixtures.py): free loopback port, temporary storage,
# generated password. Debian bookworm ships Orthanc 1.10.1 and its DICOMweb plugin 1.7.
set -euo pipefail

DEFAULT_DIR="$(cd "$(dirname "$0")/.." && pwd)/.runners/orthanc"
PACKAGES=(orthanc orthanc-dicomweb)
# Dependencies that are not runtime libraries of Orthanc (debconf front ends, merge helpers, the dcmtk tools).
SKIP=" cdebconf usrmerge install-info dcmtk lsb-base libdebian-installer4 libnewt0.52 libtextwrap1 "

library_path() { echo "$1/root/usr/lib/x86_64-linux-gnu:$1/root/usr/lib:$1/root/lib/x86_64-linux-gnu"; }

install() {
    local dir; dir="$(realpath -m "${1:-$DEFAULT_DIR}")"
    mkdir -p "$dir/debs" "$dir/root"
    local closure wanted=()
    closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
              --no-replaces --no-enhances "${PACKAGES[@]}" | grep '^[a-z0-9]' | sort -u)
    for package in $closure; do
        case "$SKIP" in *" $package "*) continue ;; esac
        if [[ " ${PACKAGES[*]} " == *" $package "* ]] || \
           [[ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)" != *"install ok installed"* ]]; then
            wanted+=("$package")
        fi
    done
    echo "orthanc: downloading ${wanted[*]}"
    (cd "$dir/debs" && { apt-get download "${wanted[@]}" 2>/dev/null || \
        { apt-get update -qq && apt-get download "${wanted[@]}"; }; })
    for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/root"; done
    local missing
    missing=$(for binary in "$dir/root/usr/sbin/Orthanc" "$dir"/root/usr/lib/orthanc/*.so*; do
                  LD_LIBRARY_PATH="$(library_path "$dir")" ldd "$binary" | grep 'not found' || true
              done | sort -u)
    if [[ -n "$missing" ]]; then
        echo "orthanc: unresolved shared libraries:"$'\n'"$missing" >&2
        exit 1
    fi
    # Whole output captured, then cut: `| head -1` closes the pipe early and pipefail turns SIGPIPE into exit 141.
    local version; version="$(LD_LIBRARY_PATH="$(library_path "$dir")" "$dir/root/usr/sbin/Orthanc" --version)"
    echo "${version%%$'\n'*}"
    touch "$dir/root/usr/sbin/Orthanc"  # dpkg -x keeps the package's dates: make would install again
    echo "orthanc: installed in $dir"
}

run() {
    local config="$1" dir; dir="$(realpath -m "${2:-$DEFAULT_DIR}")"
    export LD_LIBRARY_PATH="$(library_path "$dir")"
    export DCMDICTPATH="$dir/root/usr/share/libdcmtk17/dicom.dic"
    exec "$dir/root/usr/sbin/Orthanc" "$config"
}

plugin() { local found=("$1"/root/usr/lib/orthanc/libOrthancDicomWeb.so.*); echo "${found[0]}"; }

start() {
    local dir; dir="$(realpath -m "${1:-$DEFAULT_DIR}")"
    [[ -x "$dir/root/usr/sbin/Orthanc" ]] || install "$dir"
    local port="${ORTHANC_HTTP_PORT:-8042}" storage="${ORTHANC_STORAGE:-$dir/storage}"
    local password_file="${ORTHANC_PASSWORD_FILE:-$dir/password}"
    if [[ ! -s "$password_file" ]]; then
        (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$password_file")
    fi
    mkdir -p "$storage"
    local config="$dir/orthanc.json"
    (umask 077 && python3 - "$config" "$storage" "$port" "$password_file" "$(plugin "$dir")" <<'EOF'
import json, sys
config, storage, port, password_file, plugin = sys.argv[1:]
password = open(password_file).read().strip()
json.dump({"Name": "medtwin", "StorageDirectory": storage, "IndexDirectory": storage, "HttpPort": int(port),
           "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
           "RegisteredUsers": {"medtwin": password}, "HttpCompressionEnabled": False,
           "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}, open(config, "w"), indent=1)
EOF
    )
    echo "orthanc: http://127.0.0.1:$port/dicom-web (user medtwin, password in $password_file)"
    run "$config" "$dir"
}

case "${1:-}" in
    install) install "${2:-}" ;;
    run) run "$2" "${3:-}" ;;
    start) start "${2:-}" ;;
    *) echo "usage: $0 install [DIR] | run CONFIG [DIR] | start [DIR]" >&2; exit 2 ;;
esac
