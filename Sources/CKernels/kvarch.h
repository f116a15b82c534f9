/* The kernels' architecture switch (private to CKernels): on x86, bodies marked FAST are compiled
 * for AVX2/FMA/F16C and chosen at run time by kvr_has_fast_path(); elsewhere only the portable
 * bodies exist. */
#ifndef KVARCH_H
#define KVARCH_H
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVR_X86 1
#define FAST __attribute__((target("avx2,fma,f16c")))
#else
#define KVR_X86 0
#endif
#endif
