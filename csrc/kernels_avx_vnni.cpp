// The AVX2 path recompiled with -mavxvnni: vpdpbusd does u8 x s8 dot products into int32.
#define QL_VNNI 1
#include "kernels_avx2.cpp"  // NOLINT(build/include)
