#!/usr/bin/env bash
# Installs the system packages the build and tests need, only if missing:
# glslc (compiles the Vulkan backend's shaders at build time), the Vulkan
# loader, Mesa's drivers (lavapipe: a software Vulkan device, so the
# differential suite runs without a GPU), vulkaninfo, and the Khronos
# validation layer (its synchronisation validation checks the Vulkan backend's
# barriers in the CLI tests). Idempotent.
set -euo pipefail
pkgs=(glslc libvulkan1 mesa-vulkan-drivers vulkan-tools vulkan-validationlayers)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
