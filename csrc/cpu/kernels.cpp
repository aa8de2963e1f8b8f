// Torch-free translation unit: compiles kernels_impl.h three times (generic x86-64 / AVX2+FMA /
// AVX-512F+BW+VL+DQ) with `#pragma GCC target`, so one distributed build runs on any x86-64 CPU
// and uses the widest vectors it has; best_isa() picks at run time (cpuid + OS support, via
// __builtin_cpu_supports). On non-x86 targets only the generic copy is built.
#include "kernels.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SF_X86 1
#else
#define SF_X86 0
#endif

namespace sfcpu {

#define SF_ISA 0
namespace sf_generic {
#include "kernels_impl.h"
}  // namespace sf_generic
#undef SF_ISA

// `#pragma GCC target` regions are a GCC feature (clang ignores them): other compilers build the
// portable kernels only.
#if SF_X86 && defined(__GNUC__) && !defined(__clang__) && !defined(SPARSEFAST_CPU_GENERIC_ONLY)
#define SF_HAVE_MV 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,prefer-vector-width=256")
#define SF_ISA 1
namespace sf_avx2 {
#include "kernels_impl.h"
}  // namespace sf_avx2
#undef SF_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt,prefer-vector-width=512")
#define SF_ISA 2
namespace sf_avx512 {
#include "kernels_impl.h"
}  // namespace sf_avx512
#undef SF_ISA
#pragma GCC pop_options
#else
#define SF_HAVE_MV 0
#endif

namespace {
// A table is only built for an ISA this CPU runs: make_table() itself is compiled under the ISA's
// `#pragma GCC target`, so even filling in the table may use wider registers (seen: AVX-512 stores
// in sf_avx512::make_table on an AVX2-only EPYC -> SIGILL at first use).
struct Tables {
  KernelTable t[3][2];
  bool compiled[3];
  bool have[3];
  Tables() {
    compiled[0] = true;
    compiled[1] = compiled[2] = (SF_HAVE_MV != 0);
    have[0] = have[1] = have[2] = false;
    t[0][0] = sf_generic::make_table<float>("generic");
    t[0][1] = sf_generic::make_table<bf16_t>("generic");
    have[0] = true;
#if SF_HAVE_MV
    const int best = best_isa();
    if (best >= kAVX2) {
      t[1][0] = sf_avx2::make_table<float>("avx2");
      t[1][1] = sf_avx2::make_table<bf16_t>("avx2");
      have[1] = true;
    }
    if (best >= kAVX512) {
      t[2][0] = sf_avx512::make_table<float>("avx512");
      t[2][1] = sf_avx512::make_table<bf16_t>("avx512");
      have[2] = true;
    }
#endif
  }
};
const Tables& tables() {
  static const Tables tb;
  return tb;
}
}  // namespace

const KernelTable* kernel_table(int isa, int dtype) {
  if (isa < 0 || isa > 2 || dtype < 0 || dtype > 1) return nullptr;
  const Tables& tb = tables();
  return tb.have[isa] ? &tb.t[isa][dtype] : nullptr;
}

bool isa_compiled(int isa) {
  if (isa < 0 || isa > 2) return false;
  return tables().compiled[isa];
}

int best_isa() {
#if SF_HAVE_MV
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAVX2;
#endif
  return kGeneric;
}

bool cpu_has_bf16_dot() {
#if SF_X86 && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const char* isa_name(int isa) {
  switch (isa) {
    case kAVX512: return "avx512";
    case kAVX2: return "avx2";
    default: return "generic";
  }
}

}  // namespace sfcpu
