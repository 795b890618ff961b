#!/usr/bin/env bash
# Build llama.cpp's benchmark tools and its server (CPU only, Release) from the llama.cpp that
# the llama-cpp-python source distribution on PyPI vendors under vendor/llama.cpp.
#
# Why the sdist: the only package index this project may use is PyPI, and llama-cpp-python's
# sdist carries a complete, versioned llama.cpp tree. Pinning the sdist pins llama.cpp.
#
# Cache: ${CARPOOL_CACHE:-~/.cache/carpool}/llama.cpp/<version>/ holds the sdist, the unpacked
# tree, the build folder and bin/ with the tools. A second run finds bin/ and does nothing, so
# run it freely. Delete the folder to rebuild. About 6 minutes on 2 cores (-j2; override with
# JOBS=N). Prints the bin/ folder on stdout as its last line.
#
# Usage: benchmarks/peers/build_llama_cpp.sh        (needs cmake, gcc/g++ 12, a venv with pip)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"   # the pin: change here, and rerun the peers benchmark
TOOLS=(llama-batched-bench llama-bench llama-server)
JOBS="${JOBS:-2}"
PIP="${PIP:-python3 -m pip}"
CACHE="${CARPOOL_CACHE:-$HOME/.cache/carpool}/llama.cpp/${LLAMA_CPP_PYTHON_VERSION}"
BIN="${CACHE}/bin"

have_all_tools() {
    local tool
    for tool in "${TOOLS[@]}"; do
        [[ -x "${BIN}/${tool}" ]] || return 1
    done
}

if have_all_tools; then
    echo "llama.cpp tools cached in ${BIN}" >&2
    echo "${BIN}"
    exit 0
fi

mkdir -p "${CACHE}/sdist"
TARBALL="${CACHE}/sdist/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}.tar.gz"
if [[ ! -f "${TARBALL}" ]]; then
    echo "downloading llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION} (sdist) from PyPI" >&2
    # (pip prepares the sdist's metadata in an isolated build environment: ~2 minutes.)
    ${PIP} download --no-binary :all: --no-deps \
        "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" -d "${CACHE}/sdist" >&2
fi
SRC="${CACHE}/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"
if [[ ! -f "${SRC}/CMakeLists.txt" ]]; then
    tar -xzf "${TARBALL}" -C "${CACHE}"
fi

# CPU only, tuned for this machine (GGML_NATIVE: -march=native, so AVX-512/AMX kernels are
# compiled in where the CPU has them). No network code (OpenSSL/curl), no tests; the server
# (for serve_peers.py) without its web UI, whose assets would be downloaded or built with npm.
CC="${CC:-gcc-12}" CXX="${CXX:-g++-12}" cmake -S "${SRC}" -B "${CACHE}/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "${CACHE}/build" --config Release -j "${JOBS}" --target "${TOOLS[@]}" >&2

mkdir -p "${BIN}"
for tool in "${TOOLS[@]}"; do
    cp "${CACHE}/build/bin/${tool}" "${BIN}/${tool}"
done
"${BIN}/llama-batched-bench" --version >&2 2>&1 || true
echo "${BIN}"
