#!/usr/bin/env bash
# Build the bundle that bench/gpu_machine.sh installs on a GPU machine without a network:
#
#   bash bench/gpu_bundle.sh OUT [PIECES]     (run here, in the repo, after `make setup`)
#
# OUT/ort.tar.xz.part0..N-1: onnxruntime-gpu's package for CPython 3.12 (x86-64, CUDA 13), xz-compressed
# (about 200 MB from a 255 MB wheel) and split into PIECES pieces (default 4) small enough to copy one
# at a time; OUT/rest.tar.xz: site/ (grpcio, protobuf, simplejpeg, prometheus-client, gRPC health and
# reflection, cuda-bindings, nvImageCodec with nvJPEG, for that Python), bin/perf_analyzer (this venv's, from the tritonclient wheel) and lib/
# (the libcudart.so.12 and libb64.so.0d it links); OUT/SHA256SUMS.
set -euo pipefail
out=$1 pieces=${2:-4}
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$repo/.venv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_download() {
    "$venv/bin/python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work/wheels" "$@"
}
# cuda-bindings: page-locked batch buffers; nvimgcodec + nvjpeg: --image-decoder gpu (its nvJPEG2000 and
# nvTIFF plugins are left out: they only complain on stderr). TensorRT's libraries (over 1 GB) are not
# carried: the TensorRT variant then records why the provider does not load.
pip_download onnxruntime-gpu==1.31.1 grpcio==1.85.3 protobuf==7.36.2 simplejpeg==1.9.0 \
    grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 prometheus-client==0.26.0 \
    cuda-bindings==13.5.0 cuda-pathfinder==1.9.1 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
mkdir -p "$work/ort" "$work/rest/site" "$work/rest/bin" "$work/rest/lib" "$out"
for wheel in "$work"/wheels/*.whl; do
    case $(basename "$wheel") in
        onnxruntime_gpu-*) unzip -q -o "$wheel" -d "$work/ort" ;;
        *) unzip -q -o "$wheel" -d "$work/rest/site" ;;
    esac
done
cp "$venv/bin/perf_analyzer" "$work/rest/bin/"
cp -L "$(ldconfig -p | awk '/libb64.so.0d/ {print $NF; exit}')" "$work/rest/lib/"
cp -L "$("$venv/bin/python" -c 'import nvidia.cuda_runtime as m, pathlib; print(next(pathlib.Path(next(iter(m.__path__))).glob("lib/libcudart.so.12")))')" "$work/rest/lib/"
rm -f "$out"/ort.tar.xz.part* "$out/rest.tar.xz"
tar -C "$work/ort" -cf - . | xz -7 -T0 >"$work/ort.tar.xz"
split -n "$pieces" -d -a 1 "$work/ort.tar.xz" "$out/ort.tar.xz.part"
tar -C "$work/rest" -cf - site bin lib | xz -7 -T0 >"$out/rest.tar.xz"
(cd "$out" && sha256sum ort.tar.xz.part* rest.tar.xz >SHA256SUMS)
ls -l "$out"
