// A hand-written int8 matrix-vector product for the batch-1 step (AVX-512), used only by
// scripts/int8_kernel.py to ask one question: is inductor's generated loop what holds the int8
// step back? (docs/performance.md, section 10.) Not part of the package.
//
//   y[n] = s[n] * sum_k x[k] q[n, k]        x float32 [K], q int8 [N, K], s float32 [N]
//
// Against inductor's loop (16 weights a load, one accumulator), each row here loads 64 weights
// at once into four independent accumulators, and asks for the bytes PF ahead of time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#ifndef PF
#define PF 1024                                  // how far ahead to prefetch, in bytes
#endif

torch::Tensor int8_matvec(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  TORCH_CHECK(x.dim() == 1 && q.dim() == 2 && q.size(1) == x.size(0) && q.size(1) % 64 == 0,
              "int8_matvec: x [K], q [N, K] with K a multiple of 64");
  const int64_t N = q.size(0), K = q.size(1);
  auto y = torch::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const int8_t* row = qp + n * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K; k += 64) {
        _mm_prefetch((const char*)(row + k + PF), _MM_HINT_T0);
        __m512i w = _mm512_loadu_si512(row + k);                       // 64 weights
        auto widen = [](__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); };
        __m512 w0 = widen(_mm512_castsi512_si128(w)), w1 = widen(_mm512_extracti32x4_epi32(w, 1));
        __m512 w2 = widen(_mm512_extracti32x4_epi32(w, 2));
        __m512 w3 = widen(_mm512_extracti32x4_epi32(w, 3));
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k), w0, a0);        // four chains, not one
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k + 16), w1, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k + 32), w2, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xp + k + 48), w3, a3);
      }
      __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
      yp[n] = _mm512_reduce_add_ps(sum) * sp[n];
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int8_matvec", &int8_matvec); }
