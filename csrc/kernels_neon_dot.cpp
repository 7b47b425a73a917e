// The NEON path recompiled with -march=armv8.2-a+dotprod: SDOT replaces the widening multiplies.
// (gcc 12's SDOT intrinsics need ARMv8.2; the runtime check tests every user-level feature that
// implies, see path_features in cpu_features.cpp.)
#define QL_NEON_DOT 1
#include "kernels_neon.cpp"  // NOLINT(build/include)
