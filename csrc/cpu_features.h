// Instruction-set features: what this CPU (and its OS) supports, and what each kernel path needs.
//
// One table ties three things together, so they cannot drift apart:
//   - the features a path's runtime check tests (path_features),
//   - the compiler flags its source is built with (CMakeLists.txt: the same list, spelled as -m flags,
//     including what those flags imply, e.g. -mavx2 implies SSE4.2, POPCNT and XSAVE),
//   - the instructions found in its object code (tests/kernels/test_isa_audit.py disassembles every
//     object and checks each instruction's CPUID feature against path_feature_names()).
// This file is compiled for the baseline ISA only: it runs before anything is known about the CPU.
#ifndef QUANTLAB_CPU_FEATURES_H_
#define QUANTLAB_CPU_FEATURES_H_

#include <stdint.h>

#include <string>

namespace ql {

enum Feature : uint32_t {
  // x86-64 (names as iced-x86 / Intel's CPUID feature names)
  kSSE3 = 1u << 0,
  kSSSE3 = 1u << 1,
  kSSE4_1 = 1u << 2,
  kSSE4_2 = 1u << 3,
  kPOPCNT = 1u << 4,
  kXSAVE = 1u << 5,  // implied by -mavx; the OS must have enabled it (OSXSAVE) for any AVX state
  kAVX = 1u << 6,
  kAVX2 = 1u << 7,
  kFMA = 1u << 8,
  kF16C = 1u << 9,
  kAVX512F = 1u << 10,
  kAVX512BW = 1u << 11,
  kAVX512VL = 1u << 12,
  kAVX512_VNNI = 1u << 13,
  kAVX_VNNI = 1u << 14,  // the VEX-encoded vpdpbusd: NOT implied by AVX512_VNNI (Zen 4, Ice Lake)
  kAMX_TILE = 1u << 15,
  kAMX_INT8 = 1u << 16,
  kAMX_BF16 = 1u << 17,
  kAVX512_BF16 = 1u << 18,  // vcvtne2ps2bf16, which the AMX path's bf16 tiles are built with
  // AArch64 (Linux HWCAP names). gcc 12's SDOT intrinsics need -march=armv8.2-a, which also lets
  // the compiler use the ARMv8.1/8.2 user-level extensions: LSE atomics, RDM and CRC32.
  kASIMD = 1u << 24,
  kDOTPROD = 1u << 25,
  kLSE = 1u << 26,
  kRDM = 1u << 27,
  kCRC32 = 1u << 28,
};

// The features this CPU has and the OS has enabled (XCR0 state for AVX / AVX-512 / AMX, Linux's AMX
// tile-data permission, HWCAP on AArch64). Detected once.
uint32_t cpu_features();

// The features path `path` (a ql_path) is compiled with and checked for; 0 for the scalar path.
uint32_t path_features(int path);

// Space-separated feature names of a mask, e.g. "SSE3 SSSE3 ... AVX2 FMA F16C".
std::string feature_names(uint32_t mask);

}  // namespace ql

#endif  // QUANTLAB_CPU_FEATURES_H_
