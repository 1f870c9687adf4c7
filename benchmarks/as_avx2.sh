#!/bin/sh
# benchmarks/as_avx2.sh COMMAND [ARGS...]
#
# Run a command as on an AVX2-only CPU, on a CPU with AVX-512 (and bf16): rlrf reads the CPU's flags without
# AVX-512 and AMX (RLRF_CPU_ISA=avx2: its machine-aware defaults pick fp32, stage.json's `machine` records
# cpu_isa_limit), torch's own kernels dispatch at AVX2 (ATEN_CPU_CAPABILITY), and so do oneDNN's and MKL's
# (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS). The cores' clock and caches stay this machine's: a figure measured
# this way stands in for an AVX2-only machine of the same cores, not for another model of CPU.
#   benchmarks/as_avx2.sh .venv/bin/python benchmarks/matmul_ceiling.py
#   benchmarks/as_avx2.sh make round1
export RLRF_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
