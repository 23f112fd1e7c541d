#!/bin/sh
# Debian packages for the microcontroller tests and benchmark (tests/test_mcu*.py, bench/mcu.py):
# the Arm bare-metal cross compiler with newlib (semihosting's rdimon), and qemu-system-arm,
# which emulates the MPS2 Cortex-M boards. Idempotent: does nothing once they are there.
set -e
if command -v arm-none-eabi-gcc >/dev/null && command -v qemu-system-arm >/dev/null \
   && [ -n "$(arm-none-eabi-gcc -print-file-name=librdimon.a | grep /)" ]; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
