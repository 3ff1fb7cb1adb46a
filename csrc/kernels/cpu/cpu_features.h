// Run-time CPU feature tests shared by the kernel dispatchers. Each per-ISA file is compiled with a set
// of -m flags (CMakeLists.txt); every flag of the set must be present before its code runs, since the
// compiler may use any of them there. Included only by files built without those flags.
#pragma once

namespace lowbit {
namespace cpu {
namespace detail {

// The flags of the *_avx2.cpp files: AVX2, FMA, F16C.
inline bool cpu_has_avx2_set() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// The flags of the *_avx512.cpp files used for float code: the AVX2 set plus AVX-512 F, BW, VL, DQ
// (VNNI is tested separately by the integer GEMM, the only code that uses it).
inline bool cpu_has_avx512_set() {
  return cpu_has_avx2_set() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit
