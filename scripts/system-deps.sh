#!/usr/bin/env bash
# Debian packages the test suite needs: Prometheus + promtool (observability
# tests) and libb64 (Triton's perf_analyzer binary links it). Idempotent.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
ldconfig -p | grep -q 'libb64\.so\.0d' || need+=(libb64-0d)
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "system deps: ok"
