#!/usr/bin/env bash
# Build bench/research/cpp_floor/server.cc (bench.research.grpc_stacks' "cpp" stack) into $1 (default .bench/cpp-floor).
# Needs Debian's gRPC for C++: apt-get install libgrpc++-dev protobuf-compiler-grpc pkg-config
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="$(realpath -m "${1:-$root/.bench/cpp-floor}")"
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v grpc_cpp_plugin >/dev/null || missing+=(protobuf-compiler-grpc)
command -v pkg-config >/dev/null || missing+=(pkg-config)
pkg-config --exists grpc++ 2>/dev/null || missing+=(libgrpc++-dev)
if ((${#missing[@]})); then
  echo "cpp_floor: missing ${missing[*]}; install them with: apt-get install -y libgrpc++-dev protobuf-compiler-grpc pkg-config" >&2
  exit 3
fi
mkdir -p "$out/gen"
protoc -I "$root/proto" --cpp_out="$out/gen" --grpc_out="$out/gen" \
  --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" \
  inference/grpc_service.proto inference/model_config.proto
# shellcheck disable=SC2046  # pkg-config prints several flags
g++ -O2 -std=c++17 -I "$out/gen" -o "$out/server.tmp" "$here/server.cc" \
  "$out/gen/inference/grpc_service.pb.cc" "$out/gen/inference/grpc_service.grpc.pb.cc" \
  "$out/gen/inference/model_config.pb.cc" $(pkg-config --cflags --libs grpc++ protobuf) -lpthread
mv "$out/server.tmp" "$out/server"
echo "$out/server"
