/* Native CPU kernels of the ops' float32 paths, built on first use by kernels/native.py.

Why C: on a CPU the PyTorch paths are compositions of ATen calls. Over the score maps' few
hundred kilobytes each call costs more in dispatch than in arithmetic, and over NCHW features no
composition reads both inputs only once. One loop per op does both (measured numbers in
docs/BENCHMARKS.md). No torch headers: the functions take raw pointers and sizes (ctypes calls
them, releasing the GIL), so the library builds in well under a second with the system's C
compiler, the one torch.compile uses on a CPU.

Semantics are the PyTorch paths' (docs/ARCHITECTURE.md, "Numerical semantics"): float32
accumulation, max(norm, eps) with NaN kept, sign(0) = sign(NaN) = 0 in the gradients. No
-ffast-math: NaN and infinity propagate as in PyTorch; the loops are vectorised by the compiler
through `omp simd`.

Threads: built with -fopenmp, the library needs libgomp.so.1, and the dynamic loader hands it the
one torch already loaded, so these loops run on torch's own OpenMP workers. Measured on a 2-core
EPYC, the anomaly map at WideResNet50's shapes: 0.61-0.70 ms per image, against 0.93 with POSIX
threads created per call, which found torch's workers still spinning after its last parallel
region and shared the two cores with them. Without OpenMP (a compiler lacking it) the cosine map
splits over POSIX threads and the other loops run on the calling thread. A cosine map or a loss
only splits when each thread gets enough work to repay it. */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Elements per thread below which a call stays on the calling thread. */
#define MIN_WORK_PER_THREAD (1L << 18)
#define MAX_THREADS 64

static inline float clamp_min_nan(float x, float lo) { return x < lo ? lo : x; } /* NaN stays NaN */

static inline void finish(float d, float sa, float sb, float eps, float* err, float* cs, float* na_out,
                          float* nb_out) {
  float na = sqrtf(sa), nb = sqrtf(sb);
  float c = d / (clamp_min_nan(na, eps) * clamp_min_nan(nb, eps));
  *err = 1.0f - c;
  *cs = c;
  *na_out = na;
  *nb_out = nb;
}

/* ---- Per-position cosine over channels, NCHW: positions are contiguous, channels HW apart ---- */
/* Accumulators for a block of positions stay in L1 while the channels stream by; each channel's
   row of the block is read sequentially, four channels at a time (four pairs of streams), so a
   whole image is read once, in order, when the block covers its positions. */
#define NCHW_BLOCK 2048

static void cosine_nchw_range(const float* a, const float* b, float* err, float* stats, long N, long C, long HW,
                              long n0, long n1, long p0, long p1, float eps) {
  float d[NCHW_BLOCK], sa[NCHW_BLOCK], sb[NCHW_BLOCK];
  for (long n = n0; n < n1; n++) {
    const float* an = a + n * C * HW;
    const float* bn = b + n * C * HW;
    for (long q0 = p0; q0 < p1; q0 += NCHW_BLOCK) {
      long m = (q0 + NCHW_BLOCK < p1 ? q0 + NCHW_BLOCK : p1) - q0;
      for (long p = 0; p < m; p++) d[p] = sa[p] = sb[p] = 0.0f;
      long c = 0;
      for (; c + 4 <= C; c += 4) {
        const float *x0 = an + c * HW + q0, *x1 = x0 + HW, *x2 = x1 + HW, *x3 = x2 + HW;
        const float *y0 = bn + c * HW + q0, *y1 = y0 + HW, *y2 = y1 + HW, *y3 = y2 + HW;
#pragma omp simd
        for (long p = 0; p < m; p++) {
          float u0 = x0[p], u1 = x1[p], u2 = x2[p], u3 = x3[p];
          float v0 = y0[p], v1 = y1[p], v2 = y2[p], v3 = y3[p];
          d[p] += (u0 * v0 + u1 * v1) + (u2 * v2 + u3 * v3);
          sa[p] += (u0 * u0 + u1 * u1) + (u2 * u2 + u3 * u3);
          sb[p] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
        }
      }
      for (; c < C; c++) {
        const float *x = an + c * HW + q0, *y = bn + c * HW + q0;
#pragma omp simd
        for (long p = 0; p < m; p++) {
          float u = x[p], v = y[p];
          d[p] += u * v;
          sa[p] += u * u;
          sb[p] += v * v;
        }
      }
      long o = n * HW + q0, NHW = N * HW;
      for (long p = 0; p < m; p++)
        finish(d[p], sa[p], sb[p], eps, err + o + p, stats + o + p, stats + NHW + o + p, stats + 2 * NHW + o + p);
    }
  }
}

/* ---- Per-position cosine over channels, channels_last: each position's C channels are one row ---- */
static void cosine_rows_range(const float* a, const float* b, float* err, float* stats, long R, long C, long r0,
                              long r1, float eps) {
  for (long r = r0; r < r1; r++) {
    const float *x = a + r * C, *y = b + r * C;
    float d = 0.0f, sa = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : d, sa, sb)
    for (long c = 0; c < C; c++) {
      float u = x[c], v = y[c];
      d += u * v;
      sa += u * u;
      sb += v * v;
    }
    finish(d, sa, sb, eps, err + r, stats + r, stats + R + r, stats + 2 * R + r);
  }
}

/* ---- Splitting a call over threads ---- */
typedef struct {
  const float *a, *b;
  float *err, *stats;
  long N, C, HW, lo, hi;
  int by_image, rows;
  float eps;
} cosine_job;

static void* run_cosine_job(void* arg) {
  cosine_job* j = (cosine_job*)arg;
  if (j->rows)
    cosine_rows_range(j->a, j->b, j->err, j->stats, j->N * j->HW, j->C, j->lo, j->hi, j->eps);
  else if (j->by_image)
    cosine_nchw_range(j->a, j->b, j->err, j->stats, j->N, j->C, j->HW, j->lo, j->hi, 0, j->HW, j->eps);
  else
    cosine_nchw_range(j->a, j->b, j->err, j->stats, j->N, j->C, j->HW, 0, j->N, j->lo, j->hi, j->eps);
  return NULL;
}

/* err: (N, HW); stats: (3, N, HW) = (cos, |a|, |b|). rows != 0: a and b are (N*HW, C) rows
   (channels_last); else (N, C, HW). Returns the number of threads used. */
int ckf_cosine_map(const float* a, const float* b, float* err, float* stats, long N, long C, long HW, int rows,
                   float eps, int threads) {
  long total = N * C * HW;
  long t = total / MIN_WORK_PER_THREAD;
  if (t > threads) t = threads;
  if (t > MAX_THREADS) t = MAX_THREADS;
  if (t < 1) t = 1;
  /* NCHW splits whole images when there are enough of them, else positions (batch 1). */
  int by_image = !rows && N >= t;
  long extent = rows ? N * HW : (by_image ? N : HW);
  if (t > extent) t = extent;
  cosine_job jobs[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  int started[MAX_THREADS];
  for (long i = 0; i < t; i++) {
    cosine_job j = {a, b, err, stats, N, C, HW, extent * i / t, extent * (i + 1) / t, by_image, rows, eps};
    jobs[i] = j;
    started[i] = 0;
  }
#ifdef _OPENMP
  (void)ids;
  (void)started;
#pragma omp parallel for num_threads(t) schedule(static, 1)
  for (long i = 0; i < t; i++) run_cosine_job(&jobs[i]);
#else
  for (long i = 1; i < t; i++) started[i] = pthread_create(&ids[i], NULL, run_cosine_job, &jobs[i]) == 0;
  run_cosine_job(&jobs[0]);
  for (long i = 1; i < t; i++) {
    if (started[i])
      pthread_join(ids[i], NULL);
    else
      run_cosine_job(&jobs[i]); /* no thread to be had: do its share here */
  }
#endif
  return (int)t;
}

/* ---- Hinge energy losses: sum_k weight[k] * sum_i f_k(s_k[i]), f = |s| or max(0, m - |s|) ---- */
/* Where g is not NULL, also writes the gradient times `scale`: weight * sign(s) for |s| terms,
   -weight * sign(s) where |s| < m (else 0) for hinge terms, times scale last (so that a NaN
   upstream gradient reaches every element, as in PyTorch); sign(0) = sign(NaN) = 0 as autograd's
   abs backward gives. Sums in float32 over chunks of CHUNK, the chunks in double.
   The loop bodies are in the one form measured to vectorise with GCC 12: the sign as a difference
   of two comparisons, the mask as a select of the weight. A conditional store, a product with a
   comparison cast to float, or the sign as nested selects each left a scalar loop 30x slower
   (3.4 ms against 0.11 ms for 590k elements on a 2-core EPYC). */
#define CHUNK 4096

double ckf_energy(int K, const float* const* s, float* const* g, const long* n, const float* weight,
                  const int* high, float m, float scale) {
  double total = 0.0;
  for (int k = 0; k < K; k++) {
    const float* x = s[k];
    float* gk = g ? g[k] : NULL;
    float a = weight[k];
    double acc = 0.0;
    for (long i0 = 0; i0 < n[k]; i0 += CHUNK) {
      long i1 = i0 + CHUNK < n[k] ? i0 + CHUNK : n[k];
      float part = 0.0f;
      if (high[k] && gk) {
#pragma omp simd reduction(+ : part)
        for (long i = i0; i < i1; i++) {
          float v = x[i], e = fabsf(v), h = m - e;
          part += h < 0.0f ? 0.0f : h; /* relu, NaN kept */
          float sg = (float)(v > 0.0f) - (float)(v < 0.0f);
          gk[i] = (e < m ? -a : 0.0f) * sg * scale;
        }
      } else if (high[k]) {
#pragma omp simd reduction(+ : part)
        for (long i = i0; i < i1; i++) {
          float h = m - fabsf(x[i]);
          part += h < 0.0f ? 0.0f : h;
        }
      } else if (gk) {
#pragma omp simd reduction(+ : part)
        for (long i = i0; i < i1; i++) {
          float v = x[i];
          part += fabsf(v);
          gk[i] = ((float)(v > 0.0f) - (float)(v < 0.0f)) * a * scale;
        }
      } else {
#pragma omp simd reduction(+ : part)
        for (long i = i0; i < i1; i++) part += fabsf(x[i]);
      }
      acc += part;
    }
    total += acc * a;
  }
  return total;
}

/* The gradient alone (the backward of a forward that did not write it). */
void ckf_energy_grad(int K, const float* const* s, float* const* g, const long* n, const float* weight,
                     const int* high, float m, float scale) {
  for (int k = 0; k < K; k++) {
    const float* x = s[k];
    float* gk = g[k];
    float a = weight[k];
    if (high[k]) {
#pragma omp simd
      for (long i = 0; i < n[k]; i++) {
        float v = x[i], e = fabsf(v);
        float sg = (float)(v > 0.0f) - (float)(v < 0.0f);
        gk[i] = (e < m ? -a : 0.0f) * sg * scale;
      }
    } else {
#pragma omp simd
      for (long i = 0; i < n[k]; i++) {
        float v = x[i];
        gk[i] = ((float)(v > 0.0f) - (float)(v < 0.0f)) * a * scale;
      }
    }
  }
}

/* ---- Upsampling, sum over layers and blur: out = sum_s R_s M_s C_s^T, per image ---- */
/* R_s (out_h, h_s) and C_s^T (w_s, out_w) are the op's dense float32 matrices (bilinear
   upsampling then the Gaussian, one axis each), but each row is nonzero only in a band about a
   tenth of it wide: [r_lo, r_hi) per row of R_s, [c_lo, c_hi) per row of C_s^T. Both products
   run over the bands only, as axpys along contiguous output rows: T = M_s C_s^T (h_s, out_w),
   then out[y] += R_s[y, i] T[i] for i in row y's band. At WideResNet50's maps to 256^2 that is
   1.4M multiply-adds per image against the dense products' 8.7M. */
typedef struct {
  const float* const* maps; /* per layer (B, h, w) */
  const float* const* rows; /* per layer R (out_h, h) */
  const float* const* cols_t; /* per layer C^T (w, out_w) */
  const long* const* r_band; /* per layer (out_h, 2) */
  const long* const* c_band; /* per layer (w, 2) */
  const long* h;
  const long* w;
  int S;
  long out_h, out_w, sum_h;
} blur_args;

/* Eight floats as one value: the output row's accumulators stay in registers across the band
   (one store per output element instead of one per band row); GCC and clang lower it to AVX,
   SSE or NEON. aligned(4): loads and stores at any float address. */
typedef float f8 __attribute__((vector_size(32), aligned(4), may_alias));
#define XB 32 /* output columns per register block: four f8 */

static void upsample_blur_rows(const blur_args* g, long b, long y0, long y1, float* out, float* T) {
  long OW = g->out_w;
  /* T_s = M_s C_s^T for every layer, stacked: layer s's rows start at T + off[s] * OW; only the
     rows that output rows y0..y1 read. */
  long off[64], total = 0;
  for (int s = 0; s < g->S; s++) {
    long h = g->h[s], w = g->w[s];
    const long* rb = g->r_band[s];
    long i_lo = h, i_hi = 0;
    for (long y = y0; y < y1; y++) {
      if (rb[2 * y] < i_lo) i_lo = rb[2 * y];
      if (rb[2 * y + 1] > i_hi) i_hi = rb[2 * y + 1];
    }
    off[s] = total;
    total += h;
    const float* M = g->maps[s] + b * h * w;
    const float* CT = g->cols_t[s];
    const long* cb = g->c_band[s];
    for (long i = i_lo; i < i_hi; i++) {
      float* Ti = T + (off[s] + i) * OW;
      for (long x = 0; x < OW; x++) Ti[x] = 0.0f;
      for (long j = 0; j < w; j++) {
        float m = M[i * w + j];
        const float* c = CT + j * OW;
#pragma omp simd
        for (long x = cb[2 * j]; x < cb[2 * j + 1]; x++) Ti[x] += m * c[x];
      }
    }
  }
  /* out[y, x-block] = sum over layers and band rows i of R_s[y, i] T_s[i, x-block]. */
  for (long y = y0; y < y1; y++) {
    float* o = out + y * OW;
    long x0 = 0;
    for (; x0 + XB <= OW; x0 += XB) {
      f8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      for (int s = 0; s < g->S; s++) {
        const long* rb = g->r_band[s];
        const float* R = g->rows[s] + y * g->h[s];
        for (long i = rb[2 * y]; i < rb[2 * y + 1]; i++) {
          float r = R[i];
          const float* t = T + (off[s] + i) * OW + x0;
          a0 += r * *(const f8*)(t);
          a1 += r * *(const f8*)(t + 8);
          a2 += r * *(const f8*)(t + 16);
          a3 += r * *(const f8*)(t + 24);
        }
      }
      *(f8*)(o + x0) = a0;
      *(f8*)(o + x0 + 8) = a1;
      *(f8*)(o + x0 + 16) = a2;
      *(f8*)(o + x0 + 24) = a3;
    }
    for (; x0 < OW; x0++) {
      float a = 0.0f;
      for (int s = 0; s < g->S; s++) {
        const long* rb = g->r_band[s];
        const float* R = g->rows[s] + y * g->h[s];
        for (long i = rb[2 * y]; i < rb[2 * y + 1]; i++) a += R[i] * T[(off[s] + i) * OW + x0];
      }
      o[x0] = a;
    }
  }
}

/* out: (B, out_h, out_w). scratch: threads * (sum of h_s) * out_w floats. S <= 64. */
void ckf_upsample_blur_sum(int S, const float* const* maps, const float* const* rows, const float* const* cols_t,
                           const long* const* r_band, const long* const* c_band, const long* h, const long* w,
                           long B, long out_h, long out_w, float* out, float* scratch, int threads) {
  long sum_h = 0;
  for (int s = 0; s < S; s++) sum_h += h[s];
  blur_args g = {maps, rows, cols_t, r_band, c_band, h, w, S, out_h, out_w, sum_h};
  long t = threads < 1 ? 1 : threads;
  /* Work items: whole images when there are enough, else bands of output rows (batch 1). */
  long per_image = B >= t ? 1 : (t + B - 1) / B;
  if (per_image > out_h) per_image = out_h;
  long items = B * per_image;
  if (t > items) t = items;
#ifdef _OPENMP
#pragma omp parallel for num_threads(t) schedule(static)
#endif
  for (long k = 0; k < items; k++) {
#ifdef _OPENMP
    float* T = scratch + (long)omp_get_thread_num() * sum_h * out_w;
#else
    float* T = scratch;
#endif
    long b = k / per_image, part = k % per_image;
    long y0 = out_h * part / per_image, y1 = out_h * (part + 1) / per_image;
    upsample_blur_rows(&g, b, y0, y1, out + b * out_h * out_w, T);
  }
}

/* Threads for `jobs` independent jobs: at most `threads` (torch's count), at least one. */
static long team_size(int threads, long jobs) {
  long t = threads < 1 ? 1 : threads;
  return t > jobs ? (jobs < 1 ? 1 : jobs) : t;
}

/* ---- The flattened cosine loss: per-sample sums, and the gradients from their coefficients ---- */
/* Rows are samples (each a contiguous (rows, n) matrix row); a call splits every row into `parts`
   pieces so that rows * parts jobs keep all threads busy even at batch 1. */
static long flat_parts(long rows, long n, int threads) {
  long t = threads < 1 ? 1 : threads;
  long by_work = rows * n / MIN_WORK_PER_THREAD;
  if (t > by_work) t = by_work < 1 ? 1 : by_work;
  long parts = (t + rows - 1) / rows;
  if (parts > n) parts = n < 1 ? 1 : n;
  return parts;
}

/* Job j of rows * parts: its row and its part's range [lo, hi) of that row's n elements. */
static inline void flat_job(long j, long parts, long n, long* r, long* lo, long* hi) {
  long p = j % parts;
  *r = j / parts;
  *lo = n * p / parts;
  *hi = n * (p + 1) / parts;
}

/* sums: (rows, 3) float32 = (a.b, |a|^2, |b|^2) per row: float32 lanes over chunks of CHUNK,
   double across chunks and parts. */
void ckf_flat_sums(const float* a, const float* b, float* sums, long rows, long n, int threads) {
  long parts = flat_parts(rows, n, threads);
  /* Split rows sum their parts in double afterwards; a row in one part writes its sums directly. */
  double* acc = parts > 1 ? (double*)malloc(sizeof(double) * 3 * rows * parts) : NULL;
  if (!acc) parts = 1;
  long jobs = rows * parts;
  long t = team_size(threads, jobs);
  (void)t; /* unused without OpenMP */
#ifdef _OPENMP
#pragma omp parallel for num_threads(t) schedule(static)
#endif
  for (long j = 0; j < jobs; j++) {
    long r, lo, hi;
    flat_job(j, parts, n, &r, &lo, &hi);
    const float *x = a + r * n, *y = b + r * n;
    double d = 0.0, sa = 0.0, sb = 0.0;
    for (long i0 = lo; i0 < hi; i0 += CHUNK) {
      long i1 = i0 + CHUNK < hi ? i0 + CHUNK : hi;
      float fd = 0.0f, fa = 0.0f, fb = 0.0f;
#pragma omp simd reduction(+ : fd, fa, fb)
      for (long i = i0; i < i1; i++) {
        float u = x[i], v = y[i];
        fd += u * v;
        fa += u * u;
        fb += v * v;
      }
      d += fd;
      sa += fa;
      sb += fb;
    }
    if (acc) {
      acc[3 * j] = d;
      acc[3 * j + 1] = sa;
      acc[3 * j + 2] = sb;
    } else {
      sums[3 * r] = (float)d;
      sums[3 * r + 1] = (float)sa;
      sums[3 * r + 2] = (float)sb;
    }
  }
  if (acc)
    for (long r = 0; r < rows; r++) {
      double d = 0.0, sa = 0.0, sb = 0.0;
      for (long p = 0; p < parts; p++) {
        d += acc[3 * (r * parts + p)];
        sa += acc[3 * (r * parts + p) + 1];
        sb += acc[3 * (r * parts + p) + 2];
      }
      sums[3 * r] = (float)d;
      sums[3 * r + 1] = (float)sa;
      sums[3 * r + 2] = (float)sb;
    }
  free(acc);
}

/* ga = k_ab b + k_aa a and gb = k_ab a + k_bb b per row, coef (rows, 3) = (k_ab, k_aa, k_bb);
   ga or gb NULL: not wanted. One read of a and b, one write of each gradient. */
void ckf_flat_grads(const float* a, const float* b, const float* coef, float* ga, float* gb, long rows, long n,
                    int threads) {
  long parts = flat_parts(rows, n, threads);
  long jobs = rows * parts;
  long t = team_size(threads, jobs);
  (void)t; /* unused without OpenMP */
#ifdef _OPENMP
#pragma omp parallel for num_threads(t) schedule(static)
#endif
  for (long j = 0; j < jobs; j++) {
    long r, lo, hi;
    flat_job(j, parts, n, &r, &lo, &hi);
    const float *x = a + r * n, *y = b + r * n;
    float kab = coef[3 * r], kaa = coef[3 * r + 1], kbb = coef[3 * r + 2];
    if (ga && gb) {
      float *gx = ga + r * n, *gy = gb + r * n;
#pragma omp simd
      for (long i = lo; i < hi; i++) {
        float u = x[i], v = y[i];
        gx[i] = u * kaa + v * kab;
        gy[i] = v * kbb + u * kab;
      }
    } else if (ga) {
      float* gx = ga + r * n;
#pragma omp simd
      for (long i = lo; i < hi; i++) gx[i] = x[i] * kaa + y[i] * kab;
    } else if (gb) {
      float* gy = gb + r * n;
#pragma omp simd
      for (long i = lo; i < hi; i++) gy[i] = y[i] * kbb + x[i] * kab;
    }
  }
}
