// The NEON path recompiled with -march=armv8.2-a+dotprod: SDOT replaces the widening multiplies.
#define QL_NEON_DOT 1
#include "kernels_neon.cpp"  // NOLINT(build/include)
