#!/bin/sh
# Debian packages for the emulated-device tests (make aarch64): debootstrap builds an arm64
# root filesystem, qemu-user-static runs its programs on this machine, gcc-aarch64-linux-gnu
# cross-compiles `deploy --target native` folders for it.
set -e
if command -v debootstrap >/dev/null && command -v qemu-aarch64-static >/dev/null \
        && command -v aarch64-linux-gnu-gcc >/dev/null; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
$SUDO apt-get install -y -q debootstrap qemu-user-static gcc-aarch64-linux-gnu
