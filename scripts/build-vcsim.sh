#!/usr/bin/env bash
# Builds govmomi's vCenter simulator (vcsim) and its CLI (govc) from Debian
# bookworm's packages, offline apart from apt, into <workspace>/target/vcsim/bin.
#
# Debian's golang-github-vmware-govmomi-dev leaves out the vcsim/ and govc/
# folders, so those two come from the Debian source package of the same
# version and are overlaid on the installed library in a private GOPATH.
#
# Usage: scripts/build-vcsim.sh            (as root on Debian bookworm)
# Env:   VCSIM_OUT  output folder (default <workspace>/target/vcsim)
#        VCSIM_FORCE=1 rebuilds even when the binaries exist
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${VCSIM_OUT:-$root/target/vcsim}"
bin="$out/bin"
version="0.24.2-3"

if [[ "${VCSIM_FORCE:-0}" != 1 && -x "$bin/vcsim" && -x "$bin/govc" ]]; then
    echo "vcsim already built: $bin/vcsim"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
sudo_cmd=()
if [[ "$(id -u)" != 0 ]]; then
    sudo_cmd=(sudo)
fi
apt_lock=(-o DPkg::Lock::Timeout=600)

work="$out/build"
rm -rf "$work"
mkdir -p "$work" "$bin"

echo "== installing Debian packages"
"${sudo_cmd[@]}" apt-get "${apt_lock[@]}" update -qq
"${sudo_cmd[@]}" apt-get "${apt_lock[@]}" install -y -qq --no-install-recommends \
    golang-go golang-github-vmware-govmomi-dev golang-github-kr-pretty-dev \
    xz-utils ca-certificates dpkg-dev >/dev/null

echo "== fetching the govmomi $version source package"
# A private deb-src list keeps the machine's apt configuration untouched.
srcparts="$work/sources.list.d"
lists="$work/lists"
mkdir -p "$srcparts" "$lists/partial"
system_sources=/etc/apt/sources.list.d/debian.sources
if [[ -f "$system_sources" ]]; then
    sed 's/^Types: deb$/Types: deb-src/' "$system_sources" >"$srcparts/debian-src.sources"
else
    # Older layout: one-line sources.list entries.
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"$srcparts/debian-src.list"
fi
apt_src=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$srcparts"
         -o "Dir::State::Lists=$lists")
apt-get "${apt_src[@]}" update -qq
(cd "$work" && apt-get "${apt_src[@]}" source --download-only "golang-github-vmware-govmomi=$version" >/dev/null)
orig="$(ls "$work"/golang-github-vmware-govmomi_*.orig.tar.xz | head -n1)"

echo "== preparing the GOPATH overlay"
gopath="$work/gopath"
dest="$gopath/src/github.com/vmware/govmomi"
mkdir -p "$dest"
tar -xJf "$orig" -C "$dest" --strip-components=1 --wildcards '*/vcsim/*' '*/govc/*'
system_govmomi=/usr/share/gocode/src/github.com/vmware/govmomi
# In GOPATH mode an import path resolves to the first root that holds its
# folder, so every other package must be visible under the overlay too.
for entry in "$system_govmomi"/*; do
    name="$(basename "$entry")"
    if [[ ! -e "$dest/$name" ]]; then
        ln -s "$entry" "$dest/$name"
    fi
done

echo "== building vcsim and govc"
export GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$gopath:/usr/share/gocode"
export GOCACHE="$work/gocache"
go build -o "$bin/vcsim.tmp" github.com/vmware/govmomi/vcsim
go build -o "$bin/govc.tmp" github.com/vmware/govmomi/govc
mv "$bin/vcsim.tmp" "$bin/vcsim"
mv "$bin/govc.tmp" "$bin/govc"
rm -rf "$work"
echo "vcsim built: $bin/vcsim"
