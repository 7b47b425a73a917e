// CPU feature detection (see cpu_features.h). Baseline ISA only.
#include "cpu_features.h"

#include "quantlab_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace ql {
namespace {

struct Named {
  uint32_t bit;
  const char* name;
};
constexpr Named kNames[] = {
    {kSSE3, "SSE3"},          {kSSSE3, "SSSE3"},           {kSSE4_1, "SSE4_1"},
    {kSSE4_2, "SSE4_2"},      {kPOPCNT, "POPCNT"},         {kXSAVE, "XSAVE"},
    {kAVX, "AVX"},            {kAVX2, "AVX2"},             {kFMA, "FMA"},
    {kF16C, "F16C"},          {kAVX512F, "AVX512F"},       {kAVX512BW, "AVX512BW"},
    {kAVX512VL, "AVX512VL"},  {kAVX512_VNNI, "AVX512_VNNI"}, {kAVX_VNNI, "AVX_VNNI"},
    {kAMX_TILE, "AMX_TILE"},  {kAMX_INT8, "AMX_INT8"},     {kAMX_BF16, "AMX_BF16"},
    {kAVX512_BF16, "AVX512_BF16"}, {kASIMD, "ASIMD"},      {kDOTPROD, "DOTPROD"},
    {kLSE, "LSE"},            {kRDM, "RDM"},               {kCRC32, "CRC32"},
};

// What -mavx2 -mfma -mf16c turns on (gcc: -mavx2 implies AVX, SSE4.2 and below, POPCNT, XSAVE).
constexpr uint32_t kAvx2Set =
    kSSE3 | kSSSE3 | kSSE4_1 | kSSE4_2 | kPOPCNT | kXSAVE | kAVX | kAVX2 | kFMA | kF16C;
constexpr uint32_t kAvx512Set = kAvx2Set | kAVX512F | kAVX512BW | kAVX512VL | kAVX512_VNNI;

#if defined(__x86_64__) || defined(__i386__)
uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  // Only called when CPUID says OSXSAVE, i.e. the OS set CR4.OSXSAVE and xgetbv is legal.
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_permitted() {
#if defined(__linux__)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

uint32_t detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
  const unsigned max_leaf = a;
  uint32_t f = 0;
  __cpuid_count(1, 0, a, b, c, d);
  if (c & (1u << 0)) f |= kSSE3;
  if (c & (1u << 9)) f |= kSSSE3;
  if (c & (1u << 19)) f |= kSSE4_1;
  if (c & (1u << 20)) f |= kSSE4_2;
  if (c & (1u << 23)) f |= kPOPCNT;
  const bool osxsave = (c & (1u << 27)) != 0;
  const uint64_t xcr = osxsave ? xcr0() : 0;
  const bool ymm_os = (xcr & 0x6) == 0x6;      // SSE and AVX state
  const bool zmm_os = (xcr & 0xe6) == 0xe6;    // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool tile_os = (xcr & 0x60000) == 0x60000;  // XTILECFG, XTILEDATA
  if ((c & (1u << 26)) && osxsave) f |= kXSAVE;
  if (ymm_os) {
    if (c & (1u << 28)) f |= kAVX;
    if (c & (1u << 12)) f |= kFMA;
    if (c & (1u << 29)) f |= kF16C;
  }
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned max_sub = a;
    if (ymm_os && (b & (1u << 5))) f |= kAVX2;
    if (zmm_os) {
      if (b & (1u << 16)) f |= kAVX512F;
      if (b & (1u << 30)) f |= kAVX512BW;
      if (b & (1u << 31)) f |= kAVX512VL;
      if (c & (1u << 11)) f |= kAVX512_VNNI;
    }
    if (tile_os && (d & (1u << 24)) && (d & (1u << 25)) && amx_permitted()) {
      f |= kAMX_TILE | kAMX_INT8;
      if (d & (1u << 22)) f |= kAMX_BF16;
    }
    if (max_sub >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      if (ymm_os && (a & (1u << 4))) f |= kAVX_VNNI;
      if (zmm_os && (a & (1u << 5))) f |= kAVX512_BF16;
    }
  }
  return f;
}
#elif defined(__aarch64__)
uint32_t detect() {
  uint32_t f = kASIMD;  // Advanced SIMD is mandatory in AArch64
#if defined(__linux__) && defined(AT_HWCAP)
  const unsigned long hw = getauxval(AT_HWCAP);
  if (hw & (1UL << 7)) f |= kCRC32;     // HWCAP_CRC32
  if (hw & (1UL << 8)) f |= kLSE;       // HWCAP_ATOMICS
  if (hw & (1UL << 12)) f |= kRDM;      // HWCAP_ASIMDRDM
  if (hw & (1UL << 20)) f |= kDOTPROD;  // HWCAP_ASIMDDP
#endif
  return f;
}
#else
uint32_t detect() {
  return 0;
}
#endif

}  // namespace

uint32_t cpu_features() {
  static const uint32_t features = detect();
  return features;
}

uint32_t path_features(int path) {
  switch (path) {
    case QL_PATH_AVX2:
      return kAvx2Set;
    case QL_PATH_AVX_VNNI:
      return kAvx2Set | kAVX_VNNI;
    case QL_PATH_AVX512_VNNI:
      return kAvx512Set;
    case QL_PATH_AMX:
      return kAvx512Set | kAMX_TILE | kAMX_INT8 | kAMX_BF16 | kAVX512_BF16;
    case QL_PATH_NEON:
      return kASIMD;
    case QL_PATH_NEON_DOT:  // -march=armv8.2-a+dotprod
      return kASIMD | kDOTPROD | kLSE | kRDM | kCRC32;
    default:
      return 0;
  }
}

std::string feature_names(uint32_t mask) {
  std::string s;
  for (const Named& n : kNames) {
    if (mask & n.bit) {
      if (!s.empty()) s += ' ';
      s += n.name;
    }
  }
  return s;
}

}  // namespace ql
