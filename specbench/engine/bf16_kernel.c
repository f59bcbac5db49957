/* y[m, n] = x[m, k] @ W[n, k]^T (+ bias) (+ residual): bf16 in and out, fp32 sums, AVX512_BF16.
 *
 * Built by engine/bf16_kernel.py when the fast engine runs a bf16 model on a CPU that has
 * AVX512_BF16 (docs/engine.md has the measurements and why oneDNN is not enough here).
 *
 * W is packed once as [n / 16][k / 2][16][2]: each 64-byte vector holds one pair of k for 16
 * output columns, the operand layout of VDPBF16PS. A kernel keeps MR rows x one vector of 16
 * columns in registers and streams that column block over the whole of k (one stream per
 * thread measured fastest at every row count, against up to 8 blocks at once), so every output
 * is summed over k in the same order whatever the number of rows: a row's result does not
 * depend on how many rows are computed with it (a verify's rows equal plain decoding's).
 * Few rows are bound by reading W (no prefetch: the hardware's keeps up; prefetching for 5-7
 * rows measured slower); 8 rows and more by the arithmetic, so W is prefetched ahead, into L2;
 * more than 13 rows take several passes over a block while it is in cache (rows_at_once).
 * Column blocks are split over the OpenMP threads (torch's own runtime: the library is loaded
 * after torch). Where the CPU has AMX, built with SPECBENCH_AMX, the products run on its tiles
 * instead, for every row count (amx_linear, below).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* vectors ahead, for MR >= 8, into L2 (measured per SmolLM2 step: 64 vectors into L1 took 16 rows from 20.0 to
 * 14.2 ms; then 256 into L2, interleaved in one process at 55 GB/s: 8 rows 11.41 -> 9.29 ms, 16 rows 19.40 -> 18.39) */
#define PREFETCH 256

void pack_weight(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k) {
    int64_t pairs = k / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < n / 16; block++)
        for (int64_t p = 0; p < pairs; p++)
            for (int c = 0; c < 16; c++) {
                const uint16_t *src = w + (block * 16 + c) * k + 2 * p;
                uint16_t *dst = packed + ((block * pairs + p) * 16 + c) * 2;
                dst[0] = src[0];
                dst[1] = src[1];
            }
}

static inline float bf16_to_f32(uint16_t bits) {
    uint32_t widened = (uint32_t)bits << 16;
    float out;
    memcpy(&out, &widened, sizeof out);
    return out;
}

static inline __m512 widen_vec(__m256i bf16x16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16), 16));
}

static inline __m512 widen(const uint16_t *bf16x16) { return widen_vec(_mm256_loadu_si256((const __m256i *)bf16x16)); }

/* the lanes of a 16-wide chunk that hold one of the `left` elements still to go */
static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

#define KERNEL(MR)                                                                                                       \
    static void kernel_##MR(const uint16_t *x, int64_t k, const uint16_t *wp, int64_t block, uint16_t *y, int64_t n,    \
                            const uint16_t *bias, const uint16_t *res) {                                                \
        int64_t pairs = k / 2, col = block * 16;                                                                         \
        __m512 acc[MR];                                                                                                  \
        for (int m = 0; m < MR; m++) acc[m] = _mm512_setzero_ps();                                                       \
        const uint32_t *x32 = (const uint32_t *)x;                                                                       \
        const __m512i *w = (const __m512i *)(wp + block * pairs * 32);                                                   \
        for (int64_t p = 0; p < pairs; p++) {                                                                            \
            if (MR >= 8) _mm_prefetch((const char *)(w + p + PREFETCH), _MM_HINT_T1);                                    \
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + p);                                                           \
            for (int m = 0; m < MR; m++)                                                                                 \
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(x32[m * pairs + p]), wv);                  \
        }                                                                                                                \
        for (int m = 0; m < MR; m++) {                                                                                   \
            __m512 out = acc[m];                                                                                         \
            if (bias) out = _mm512_add_ps(out, widen(bias + col));                                                       \
            if (res) out = _mm512_add_ps(out, widen(res + m * n + col));                                                 \
            _mm256_storeu_si256((__m256i *)(y + m * n + col), (__m256i)_mm512_cvtneps_pbh(out));                         \
        }                                                                                                                \
    }

KERNEL(1)
KERNEL(2)
KERNEL(3)
KERNEL(4)
KERNEL(5)
KERNEL(6)
KERNEL(7)
KERNEL(8)
KERNEL(9)
KERNEL(10)
KERNEL(11)
KERNEL(12)
KERNEL(13)

typedef void (*kernel)(const uint16_t *, int64_t, const uint16_t *, int64_t, uint16_t *, int64_t, const uint16_t *,
                       const uint16_t *);

#define MAX_ROWS 13
static const kernel KERNELS[MAX_ROWS + 1] = {0,        kernel_1, kernel_2,  kernel_3,  kernel_4,  kernel_5,  kernel_6,
                                             kernel_7, kernel_8, kernel_9, kernel_10, kernel_11, kernel_12, kernel_13};

/* The rows of the next pass over a block when `left` rows remain. Each row's sum over k is one
 * chain of VDPBF16PS (the order that makes a row's result its own), so a pass of few rows waits on
 * the instruction's latency even with the block in cache, and costs about what a full pass costs:
 * passes of 8, 4, 2 and 1 rows made 3 rows cost 1.3x and 7 rows 1.9x what 4 and 8 cost. So up to
 * 13 rows run in one pass; more in passes of 8 and a last one of the rest, which measured faster
 * than one pass of 16 (the 16-row kernel this replaced reached 373-396 GFLOP/s of the 470 peak from
 * memory, passes of 8 412-442). scripts/bench_products.py --against d6fc321 (SmolLM2's 121
 * products of a step, 2 threads, 35 GB/s): 3 rows 10.17 -> 7.80 ms, 7 rows 14.62 -> 8.10, 9 rows
 * 9.43 -> 8.37, 13 rows 12.55 -> 8.77, 16 rows 11.54 -> 10.45; 1, 2, 4 and 8 rows unchanged. */
static int rows_at_once(int64_t left) { return left <= MAX_ROWS ? (int)left : 8; }

#ifdef SPECBENCH_AMX
/* AMX (TDPBF16PS) where the CPU has it and Linux lets the process use it. The packed layout above is
 * AMX's B operand as it is: the 16 pairs of k of a 32-wide chunk of k for 16 columns are 16 rows of
 * 64 bytes. Each output is still summed over k in one fixed order, chunk by chunk, and a tile's row
 * m of C reads only row m of A: a row's result does not depend on the rows computed with it. The
 * sums are AMX's, not VDPBF16PS's, so one process uses one of the two for every row count. */
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* LDTILECFG on the whole 64 bytes: GCC 12's _tile_loadconfig tells the compiler it reads 8 of them, so the
 * stores to the rest may be dropped (seen at -O3: garbage in the unused tiles' widths, and a SIGSEGV) */
static inline void load_tile_config(const tile_config *config) { __asm__ volatile("ldtilecfg %0" ::"m"(*config)); }

/* GCC 12's tile loads and stores are asm statements that do not say they read or write memory: the
 * compiler may drop or move the stores that fill a buffer a tile then loads, and the loads that read
 * what a tile stored. A barrier between the two orders them (seen at -O3: attention's key layout
 * never reached the tile) */
#define TILE_MEMORY() __asm__ volatile("" ::: "memory")

static int amx_on = 0;

/* on = 1: AMX from now in this process where Linux grants the tile state; 0: off; -1: unchanged.
 * Returns 1 where AMX is on. */
int amx_enable(int on) {
    if (on == 1 && !amx_on) amx_on = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    if (on == 0) amx_on = 0;
    return amx_on;
}

/* Tile t of rows[t] rows of 64 bytes (0: unused), for t = 0..7 */
static void configure_tiles(const int rows[8]) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = (uint8_t)rows[t];
        config.colsb[t] = rows[t] ? 64 : 0;
    }
    load_tile_config(&config);
}

/* Tiles 0, 1: the sums of column block b for rows 0-15 and 16-31 of a pass; 2, 3: those of block b + 1;
 * 4, 5: the two row groups' chunk of x (32 k); 6, 7: the weight tiles of blocks b and b + 1. A pass
 * takes two blocks and up to 32 rows, so that each weight tile loaded serves both row groups and four
 * sums are under way at once (a single one waits on its own TDPBF16PS). rows1 = 0: one row group. */
static void amx_configure(int rows0, int rows1) {
    const int rows[8] = {rows0, rows1, rows0, rows1, rows0, rows1, 16, 16};
    configure_tiles(rows);
}

static void amx_store(int tile_rows, const float sums[16][16], int64_t row, int64_t col, int64_t n, uint16_t *y,
                      const uint16_t *bias, const uint16_t *res) {
    for (int r = 0; r < tile_rows; r++) {
        __m512 out = _mm512_load_ps(sums[r]);
        if (bias) out = _mm512_add_ps(out, widen(bias + col));
        if (res) out = _mm512_add_ps(out, widen(res + (row + r) * n + col));
        _mm256_storeu_si256((__m256i *)(y + (row + r) * n + col), (__m256i)_mm512_cvtneps_pbh(out));
    }
}

/* amx_linear: tile TILE's sums through its `sums` buffer to y (a tile number must be a constant: a macro) */
#define STORE_SUMS(TILE, tile_rows, first_row, col)                       \
    do {                                                                   \
        TILE_MEMORY();                                                     \
        _tile_stored(TILE, sums, 64);                                      \
        TILE_MEMORY();                                                     \
        amx_store(tile_rows, sums, first_row, col, n, y, bias, res);       \
    } while (0)

static void amx_linear(const uint16_t *x, int64_t m, int64_t k, const uint16_t *wp, int64_t n, uint16_t *y,
                       const uint16_t *bias, const uint16_t *res) {
    int64_t pairs = k / 2, chunks = k / 32, blocks = n / 16;
    #pragma omp parallel
    {
        float sums[16][16] __attribute__((aligned(64)));
        int configured = -1;
        #pragma omp for schedule(static)
        for (int64_t pair = 0; pair < (blocks + 1) / 2; pair++) {
            int64_t b0 = 2 * pair, col0 = b0 * 16, col1 = col0 + 16;
            int both = b0 + 1 < blocks;
            const uint16_t *w0 = wp + b0 * pairs * 32, *w1 = w0 + pairs * 32;
            for (int64_t row = 0; row < m; row += 32) {
                int rows0 = (int)(m - row < 16 ? m - row : 16);
                int rows1 = (int)(m - row - 16 <= 0 ? 0 : m - row - 16 < 16 ? m - row - 16 : 16);
                if (rows0 * 32 + rows1 != configured) {
                    amx_configure(rows0, rows1);
                    configured = rows0 * 32 + rows1;
                }
                const uint16_t *x0 = x + row * k, *x1 = x0 + 16 * k;
                _tile_zero(0);
                _tile_zero(2);
                if (rows1) {
                    _tile_zero(1);
                    _tile_zero(3);
                }
                for (int64_t c = 0; c < chunks; c++) {
                    _tile_loadd(4, x0 + c * 32, k * 2);
                    _tile_loadd(6, w0 + c * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (both) {
                        _tile_loadd(7, w1 + c * 512, 64);
                        _tile_dpbf16ps(2, 4, 7);
                    }
                    if (rows1) {
                        _tile_loadd(5, x1 + c * 32, k * 2);
                        _tile_dpbf16ps(1, 5, 6);
                        if (both) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                STORE_SUMS(0, rows0, row, col0);
                if (both) STORE_SUMS(2, rows0, row, col1);
                if (rows1) STORE_SUMS(1, rows1, row + 16, col0);
                if (rows1 && both) STORE_SUMS(3, rows1, row + 16, col1);
            }
        }
        if (configured >= 0) _tile_release();
    }
}
#undef STORE_SUMS

/* As dot_peak for TDPBF16PS: 4 accumulator tiles of 16 x 16, each round 16 x 16 x 32 products */
double amx_peak(int64_t iterations) {
    double start = omp_get_wtime();
    int threads = 1;
    #pragma omp parallel
    {
        #pragma omp single
        threads = omp_get_num_threads();
        const int rows[8] = {16, 16, 16, 16, 16, 16, 0, 0};
        configure_tiles(rows);
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); _tile_zero(4); _tile_zero(5);
        for (int64_t it = 0; it < iterations; it++) {
            _tile_dpbf16ps(0, 4, 5);
            _tile_dpbf16ps(1, 4, 5);
            _tile_dpbf16ps(2, 4, 5);
            _tile_dpbf16ps(3, 4, 5);
        }
        _tile_release();
    }
    return (double)threads * (double)iterations * 4.0 * 16.0 * 16.0 * 32.0 * 2.0 / (omp_get_wtime() - start);
}
#else
int amx_enable(int on) { (void)on; return 0; }
double amx_peak(int64_t iterations) { (void)iterations; return 0.0; }
#endif

/* x: [m, k] contiguous; y, res: [m, n] contiguous; n % 16 == 0, k % 2 == 0 (the caller checks).
 * Threads split the column blocks; each takes all rows of its block in turn (rows_at_once), so W
 * is read from memory once and the later row chunks find it in cache. One block per kernel call:
 * one stream of W per thread read faster than several (measured on 2 threads, SmolLM2's 211
 * products: 1 row 7.1 ms against 8.3 with 8 blocks at once; 8 rows 8.7 against 9.8 with 2). */
void linear(const uint16_t *x, int64_t m, int64_t k, const uint16_t *wp, int64_t n, uint16_t *y,
            const uint16_t *bias, const uint16_t *res) {
#ifdef SPECBENCH_AMX
    if (amx_on && k % 32 == 0) {
        amx_linear(x, m, k, wp, n, y, bias, res);
        return;
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < n / 16; block++)
        for (int64_t row = 0; row < m;) {
            int mr = rows_at_once(m - row);
            KERNELS[mr](x + row * k, k, wp, block, y + row * n, n, bias, res ? res + row * n : 0);
            row += mr;
        }
}

/* out = weight * bf16(x * rsqrt(mean(x^2) + eps)), rows of x: transformers' RMSNorm of a bf16
 * state (computed in fp32, rounded, then scaled by the bf16 weight and rounded again), in one
 * pass per row; torch's own took 30-45 us for one 576-wide row. dim % 16 == 0. */
void rms_norm(const uint16_t *x, int64_t rows, int64_t dim, const uint16_t *weight, float eps, uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *yr = out + r * dim;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) {
            __m512 v = widen(xr + i);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += 16) {
            __m512 back = widen_vec((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(widen(xr + i), scale)));
            _mm256_storeu_si256((__m256i *)(yr + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(widen(weight + i), back)));
        }
    }
}

/* exp of 16 floats: 2^n * p(r) with x = n ln2 + r (Cephes' polynomial), within 2 ulp; exactly 0
 * below -87.3, where expf underflows too (masked scores must weigh nothing) */
static inline __m512 exp16(__m512 x) {
    __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps((__mmask16)~under, _mm512_scalef_ps(p, n));
}

/* row[j] = exp(row[j] - top) for j < span, in place: a softmax's numerators */
static void exp_shifted(float *row, int64_t span, float top) {
    for (int64_t j = 0; j < span; j += 16) {
        __mmask16 valid = tail_mask(span - j);
        __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, row + j), _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(row + j, valid, e);
    }
}

/* Attention of `rows` query rows per head over the first `span` cached positions, in fp32 as
 * transformers' eager attention (scores scaled, plus the additive mask, softmax, weighted sum of
 * the values), the result rounded to bf16 into out [batch, rows, heads, dim]. Query head h reads
 * key/value head h / (heads / kv_heads). Keys and values: position stride dim; the mask (may be
 * NULL): [batch, rows, span] with the given strides, contiguous along span. Each (row, head) is
 * computed alone, its sums over positions in position order, so a row's result does not depend
 * on the other rows, and masked positions (weight exactly 0) add exact zeros: a tree node's
 * result is that of the same tokens at consecutive positions (plain decoding's).
 * The queries that read one key/value head are taken QB at a time (16 accumulators), so that
 * each key and value row is widened to fp32 once for all of them. dim % 16 == 0, dim <= 256. */
#define QB_MAX 16
static void attend_block(const uint16_t *const *queries, const float *const *biases, int nq, const uint16_t *keys,
                         const uint16_t *values, int64_t span, int64_t dim, float scale, float *scores,
                         uint16_t *const *outs) {
    int64_t chunks = dim / 16;
    __m512 kv[16];
    float query[QB_MAX][256] __attribute__((aligned(64)));
    for (int i = 0; i < nq; i++)
        for (int64_t c = 0; c < chunks; c++) _mm512_store_ps(query[i] + 16 * c, widen(queries[i] + 16 * c));
    float top[QB_MAX];
    for (int i = 0; i < nq; i++) top[i] = -INFINITY;
    for (int64_t j = 0; j < span; j++) {
        for (int64_t c = 0; c < chunks; c++) kv[c] = widen(keys + j * dim + 16 * c);
        for (int i = 0; i < nq; i++) {
            __m512 dot = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) dot = _mm512_fmadd_ps(_mm512_load_ps(query[i] + 16 * c), kv[c], dot);
            float score = _mm512_reduce_add_ps(dot) * scale + (biases[i] ? biases[i][j] : 0.0f);
            scores[i * span + j] = score;
            top[i] = score > top[i] ? score : top[i];
        }
    }
    for (int i = 0; i < nq; i++) {
        float *row = scores + i * span;
        exp_shifted(row, span, top[i]);
    }
    /* as attend_block_64: the sums in position order, then one division */
    float acc[QB_MAX][256] __attribute__((aligned(64)));
    float total[QB_MAX] = {0.0f};
    memset(acc, 0, sizeof(float) * (size_t)nq * 256);
    for (int64_t j = 0; j < span; j++) {
        for (int64_t c = 0; c < chunks; c++) kv[c] = widen(values + j * dim + 16 * c);
        for (int i = 0; i < nq; i++) {
            float e = scores[i * span + j];
            total[i] += e;
            __m512 weight = _mm512_set1_ps(e);
            for (int64_t c = 0; c < chunks; c++)
                _mm512_store_ps(acc[i] + 16 * c, _mm512_fmadd_ps(weight, kv[c], _mm512_load_ps(acc[i] + 16 * c)));
        }
    }
    for (int i = 0; i < nq; i++) {
        __m512 inverse = _mm512_set1_ps(1.0f / total[i]);
        for (int64_t c = 0; c < chunks; c++)
            _mm256_storeu_si256((__m256i *)(outs[i] + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(acc[i] + 16 * c), inverse)));
    }
}

/* Lane k of the result: the sum of the 16 lanes of v[k], by a fixed tree (the same for every call) */
static inline __m512 sum_each(__m512 v[16]) {
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++) /* within 128-bit lanes: a0+a2, b0+b2, a1+a3, b1+b3 */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* each 128-bit lane: the partial sums of 4 vectors */
        __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* sum_j e_j v_j and sum_j e_j in position order, then one division, for up to 4 queries (their
 * weights e in rows of `scores`, `stride` apart): masked positions add exact zeros, so a tree node's
 * sums are those of the same tokens at consecutive positions */
static void values_64(const float *scores, int64_t stride, int nq, const uint16_t *values, int64_t span, uint16_t *const *outs) {
    __m512 acc[4][4];
    float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < span; j++) {
        __m512 value[4];
        for (int c = 0; c < 4; c++) value[c] = widen(values + j * 64 + 16 * c);
        for (int i = 0; i < 4; i++)
            if (i < nq) {
                float e = scores[i * stride + j];
                total[i] += e;
                __m512 weight = _mm512_set1_ps(e);
                for (int c = 0; c < 4; c++) acc[i][c] = _mm512_fmadd_ps(weight, value[c], acc[i][c]);
            }
    }
    for (int i = 0; i < 4; i++)
        if (i < nq) {
            __m512 inverse = _mm512_set1_ps(1.0f / total[i]);
            for (int c = 0; c < 4; c++)
                _mm256_storeu_si256((__m256i *)(outs[i] + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][c], inverse)));
        }
}

/* attend_block for dim 64 (SmolLM2, Llama-3.2-1B...): scores 16 keys at a time with VDPBF16PS
 * on the bf16 rows themselves (each key's products summed by one fixed tree, sum_each), and
 * the weighted sum of the values in registers, 4 queries at a time. Same results for a row
 * whatever the others, as attend_block. */
static void attend_block_64(const uint16_t *const *queries, const float *const *biases, int nq, const uint16_t *keys,
                            const uint16_t *values, int64_t span, float scale, float *scores, uint16_t *const *outs) {
    float top[4];
    for (int i = 0; i < nq; i++) {
        __m512bh q0 = (__m512bh)_mm512_loadu_si512(queries[i]), q1 = (__m512bh)_mm512_loadu_si512(queries[i] + 32);
        __m512 best = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < span; j += 16) {
            int64_t here = span - j < 16 ? span - j : 16;
            __m512 dots[16];
            for (int k = 0; k < 16; k++) {
                if (k < here) {
                    const uint16_t *key = keys + (j + k) * 64;
                    dots[k] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(key)), q1,
                                               (__m512bh)_mm512_loadu_si512(key + 32));
                } else
                    dots[k] = _mm512_setzero_ps();
            }
            __mmask16 valid = tail_mask(here);
            __m512 row = _mm512_mul_ps(sum_each(dots), _mm512_set1_ps(scale));
            if (biases[i]) row = _mm512_add_ps(row, _mm512_maskz_loadu_ps(valid, biases[i] + j));
            _mm512_mask_storeu_ps(scores + i * span + j, valid, row);
            best = _mm512_mask_max_ps(best, valid, best, row);
        }
        top[i] = _mm512_reduce_max_ps(best);
        exp_shifted(scores + i * span, span, top[i]);
    }
    values_64(scores, span, nq, values, span, outs);
}

#ifdef SPECBENCH_AMX
/* the 16 x 16 32-bit elements of r transposed in place (row i becomes column i) */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* attend_block_64 with the scores on AMX, for up to 16 queries of one key/value head: C [queries x 16
 * positions] = Q (two chunks of 32 dims) times 16 keys laid out as AMX's B operand (each key's pairs of
 * dims a column: the 16 x 16 block of 32-bit pairs transposed). A score reads only its query and its
 * key, so it is the same whatever the other queries and wherever the key sits in the cache. Then the
 * scale and mask, softmax and values as attend_block_64, 4 queries at a time. */
static void attend_amx_64(const uint16_t *const *queries, const float *const *biases, int nq, const uint16_t *keys,
                          const uint16_t *values, int64_t span, float scale, uint16_t *const *outs) {
    int64_t stride = (span + 15) & ~(int64_t)15;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(nq * stride));
    uint16_t query[16][64] __attribute__((aligned(64)));
    uint32_t layout[16][16] __attribute__((aligned(64)));
    for (int i = 0; i < nq; i++) memcpy(query[i], queries[i], 128);
    const int rows[8] = {nq, nq, nq, 16, 0, 0, 0, 0}; /* C, Q's dims 0-31, Q's dims 32-63, 16 keys' pairs of 32 dims */
    configure_tiles(rows);
    TILE_MEMORY();
    _tile_loadd(1, query[0], 128);
    _tile_loadd(2, query[0] + 32, 128);
    for (int64_t j = 0; j < span; j += 16) {
        int64_t here = span - j < 16 ? span - j : 16;
        __m512i pairs[16];
        _tile_zero(0);
        for (int half = 0; half < 2; half++) {
            for (int key = 0; key < 16; key++)
                pairs[key] = key < here ? _mm512_loadu_si512(keys + (j + key) * 64 + 32 * half) : _mm512_setzero_si512();
            transpose16(pairs);
            for (int p = 0; p < 16; p++) _mm512_store_si512(layout[p], pairs[p]);
            TILE_MEMORY();
            _tile_loadd(3, layout[0], 64);
            TILE_MEMORY(); /* the next half's layout is written after this load */
            if (half == 0)
                _tile_dpbf16ps(0, 1, 3);
            else
                _tile_dpbf16ps(0, 2, 3);
        }
        _tile_stored(0, scores + j, stride * 4);
    }
    _tile_release();
    TILE_MEMORY();
    for (int i = 0; i < nq; i++) {
        float *row = scores + i * stride;
        __m512 best = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < span; j += 16) {
            __mmask16 valid = tail_mask(span - j);
            __m512 score = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, row + j), _mm512_set1_ps(scale));
            if (biases[i]) score = _mm512_add_ps(score, _mm512_maskz_loadu_ps(valid, biases[i] + j));
            _mm512_mask_storeu_ps(row + j, valid, score);
            best = _mm512_mask_max_ps(best, valid, best, score);
        }
        exp_shifted(row, span, _mm512_reduce_max_ps(best));
    }
    for (int i = 0; i < nq; i += 4) values_64(scores + i * stride, stride, nq - i < 4 ? nq - i : 4, values, span, outs + i);
    free(scores);
}
#endif

void attend(const uint16_t *q, int64_t q_batch, int64_t q_row, int64_t q_head, const uint16_t *k, const uint16_t *v,
            int64_t kv_batch, int64_t kv_head, const uint16_t *mask, int64_t mask_batch, int64_t mask_row, int64_t batch,
            int64_t heads, int64_t kv_heads, int64_t rows, int64_t span, int64_t dim, float scale, uint16_t *out) {
    int64_t group = heads / kv_heads, per_head = group * rows;
    int amx = 0;
#ifdef SPECBENCH_AMX
    amx = amx_on && dim == 64; /* the scores on AMX, 16 queries at a time */
#endif
    int qb = amx ? 16 : dim == 64 ? 4 : (int)(QB_MAX / (dim / 16) > 0 ? QB_MAX / (dim / 16) : 1);  /* 16 accumulators' worth of queries */
    int64_t blocks = (per_head + qb - 1) / qb, units = batch * kv_heads * blocks;
    /* the mask in fp32 once: [batch, rows, span] */
    float *bias = 0;
    int64_t mask_batches = mask ? (mask_batch ? batch : 1) : 0;
    if (mask) {
        bias = (float *)malloc(sizeof(float) * (size_t)(mask_batches * rows * span));
        for (int64_t b = 0; b < mask_batches; b++)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t j = 0; j < span; j++) bias[(b * rows + r) * span + j] = bf16_to_f32(mask[b * mask_batch + r * mask_row + j]);
    }
    /* on the threads once there is work for them: one row of SmolLM2's 9 heads from ~35 positions
     * (at 137 positions a step's attention for one row took 0.45 ms on one thread, 0.33 on two) */
    #pragma omp parallel for schedule(static) if (batch * heads * rows * span * dim > 20000)
    for (int64_t u = 0; u < units; u++) {
        int64_t b = u / (kv_heads * blocks), kvh = (u / blocks) % kv_heads, first = (u % blocks) * qb;
        int nq = (int)(per_head - first < qb ? per_head - first : qb);
        const uint16_t *queries[QB_MAX];
        const float *biases[QB_MAX];
        uint16_t *outs[QB_MAX];
        for (int i = 0; i < nq; i++) {
            int64_t h = kvh * group + (first + i) / rows, r = (first + i) % rows;
            queries[i] = q + b * q_batch + r * q_row + h * q_head;
            biases[i] = bias ? bias + ((mask_batch ? b : 0) * rows + r) * span : 0;
            outs[i] = out + ((b * rows + r) * heads + h) * dim;
        }
#ifdef SPECBENCH_AMX
        if (amx) {
            attend_amx_64(queries, biases, nq, k + b * kv_batch + kvh * kv_head, v + b * kv_batch + kvh * kv_head, span, scale, outs);
            continue;
        }
#endif
        float *scores = (float *)malloc(sizeof(float) * (size_t)(nq * span + 16));
        if (dim == 64)
            attend_block_64(queries, biases, nq, k + b * kv_batch + kvh * kv_head, v + b * kv_batch + kvh * kv_head, span, scale,
                            scores, outs);
        else
            attend_block(queries, biases, nq, k + b * kv_batch + kvh * kv_head, v + b * kv_batch + kvh * kv_head, span, dim,
                         scale, scores, outs);
        free(scores);
    }
    free(bias);
}

/* x * sigmoid(x) in fp32, 16 at a time: the MLP's activation and the Hydra ResBlocks' */
static inline __m512 silu16(__m512 x) {
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* out[r] = bf16(bf16(silu(gate)) * up) for gate_up[r] = [gate | up] (width each): the MLP's
 * act_fn(gate) * up in transformers' two roundings, in one pass. width % 16 == 0. */
static void silu_mul_row(const uint16_t *gate_up, int64_t width, uint16_t *out) {
    for (int64_t i = 0; i < width; i += 16) {
        __m512 back = widen_vec((__m256i)_mm512_cvtneps_pbh(silu16(widen(gate_up + i))));
        __m512 product = _mm512_mul_ps(back, widen(gate_up + width + i));
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(product));
    }
}

/* On the threads from 4 rows of SmolLM2's 1536 on (16 rows: 0.32 -> 0.18 ms per step); fewer rows
 * are not worth waking them, nor the cost of an OpenMP region that runs on one (30 of them a step). */
void silu_mul(const uint16_t *gate_up, int64_t rows, int64_t width, uint16_t *out) {
    if (rows * width < 6144) {
        for (int64_t r = 0; r < rows; r++) silu_mul_row(gate_up + r * 2 * width, width, out + r * width);
        return;
    }
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate_up + r * 2 * width, width, out + r * width);
}

/* q and k of one row rotated in place, as transformers' x * cos + rotate_half(x) * sin in bf16
 * (each product rounded, then their sum): dim % 32 == 0 */
static void rotate_row(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t dim) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i += 16) {
        __m512 lo = widen(x + i), hi = widen(x + half + i);
        __m512 c_lo = widen(cos + i), c_hi = widen(cos + half + i), s_lo = widen(sin + i), s_hi = widen(sin + half + i);
        __m256i a = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(lo, c_lo));
        __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(hi, s_lo));  /* rotate_half: -hi, so -(hi * s) */
        __m256i c = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(hi, c_hi));
        __m256i d = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(lo, s_hi));
        __m256i out_lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(widen_vec(a), widen_vec(b)));
        __m256i out_hi = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(widen_vec(c), widen_vec(d)));
        _mm256_storeu_si256((__m256i *)(x + i), out_lo);
        _mm256_storeu_si256((__m256i *)(x + half + i), out_hi);
    }
}

/* The additive mask of rows that each see the positions up to their own slot (a causal chunk after
 * the cache): [rows, span] bf16, 0 or the bf16 minimum, as the mask torch builds for it. */
static uint16_t *causal_mask(const int64_t *slots, int64_t rows, int64_t span) {
    uint16_t *mask = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * span));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < span; j++) mask[r * span + j] = j <= slots[r] ? 0 : 0xFF7F;
    return mask;
}

/* One Llama decoder layer of batch 1 over a preallocated cache, in one call: the lean layer's
 * operations (engine/lean_layer.py) on these kernels, in the same order and with the same
 * roundings, without a Python call between them. The new keys and values go to the cache at
 * `slots`; attention reads its first `span` positions, under `mask` [rows, span] (row stride
 * mask_row), or with none each row up to its own slot. out may not alias hidden. */
void layer_step(const uint16_t *hidden, int64_t rows, int64_t width, uint16_t *out,
                const uint16_t *norm1, float eps1, const uint16_t *norm2, float eps2,
                const uint16_t *qkv_w, const uint16_t *qkv_bias, const uint16_t *o_w, const uint16_t *o_bias,
                const uint16_t *gate_up_w, const uint16_t *gate_up_bias, const uint16_t *down_w, const uint16_t *down_bias,
                int64_t heads, int64_t kv_heads, int64_t dim, int64_t intermediate,
                const uint16_t *cos, const uint16_t *sin, uint16_t *keys, uint16_t *values, int64_t capacity,
                const int64_t *slots, int64_t span, const uint16_t *mask, int64_t mask_row, float scale) {
    int64_t qkv_width = (heads + 2 * kv_heads) * dim;
    uint16_t *normed = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * width));
    uint16_t *qkv = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * qkv_width));
    uint16_t *attended = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * heads * dim));
    uint16_t *mid = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * width));
    uint16_t *gate_up = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * 2 * intermediate));
    uint16_t *act = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * intermediate));
    uint16_t *causal = !mask && rows > 1 ? causal_mask(slots, rows, span) : 0;
    if (causal) mask = causal, mask_row = span;
    rms_norm(hidden, rows, width, norm1, eps1, normed);
    linear(normed, rows, width, qkv_w, qkv_width, qkv, qkv_bias, 0);
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = qkv + r * qkv_width;
        for (int64_t h = 0; h < heads + kv_heads; h++) rotate_row(row + h * dim, cos + r * dim, sin + r * dim, dim);
        for (int64_t h = 0; h < kv_heads; h++) {
            memcpy(keys + (h * capacity + slots[r]) * dim, row + (heads + h) * dim, sizeof(uint16_t) * (size_t)dim);
            memcpy(values + (h * capacity + slots[r]) * dim, row + (heads + kv_heads + h) * dim, sizeof(uint16_t) * (size_t)dim);
        }
    }
    attend(qkv, rows * qkv_width, qkv_width, dim, keys, values, kv_heads * capacity * dim, capacity * dim, mask, 0, mask_row,
           1, heads, kv_heads, rows, span, dim, scale, attended);
    linear(attended, rows, heads * dim, o_w, width, mid, o_bias, hidden);
    rms_norm(mid, rows, width, norm2, eps2, normed);
    linear(normed, rows, width, gate_up_w, 2 * intermediate, gate_up, gate_up_bias, 0);
    silu_mul(gate_up, rows, intermediate, act);
    linear(act, rows, intermediate, down_w, width, out, down_bias, mid);
    free(normed); free(qkv); free(attended); free(mid); free(gate_up); free(act); free(causal);
}

/* A ResBlock of Hydra's heads as head_top reads it: out = res(x) + silu(linear(x)), the residual
 * a product where `res_w` is given (a grounded head's first block, wider than H), else x itself. */
typedef struct {
    const uint16_t *lin_w, *lin_bias, *res_w, *res_bias;
    int64_t in_width;
} res_block;

/* The `top` most likely tokens of each of n rows of features x [n, k] under one Hydra head: its
 * ResBlocks (bf16, each result rounded as torch rounds res(x) + act(linear(x)): the product, the
 * SiLU and the sum each once), then the LM head [vocab, H] (+ bias): ids [n, top] by descending
 * logit (ties: the lower id first) and probs [n, top], their softmax probabilities over the row in
 * fp32. One call for what took a drafting level a dozen torch calls (docs/heads.md). */
void head_top(const uint16_t *x, int64_t n, const res_block *blocks, int64_t count, int64_t hidden, const uint16_t *lm_w,
              const uint16_t *lm_bias, int64_t vocab, int64_t top, int64_t *ids, float *probs) {
    uint16_t *state[2] = {(uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * hidden)),
                          (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * hidden))};
    uint16_t *lin = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * hidden));
    uint16_t *logits = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * vocab));
    const uint16_t *in = x;
    for (int64_t b = 0; b < count; b++) {
        const res_block *block = blocks + b;
        uint16_t *out = state[b % 2];
        linear(in, n, block->in_width, block->lin_w, hidden, lin, block->lin_bias, 0);
        if (block->res_w) linear(in, n, block->in_width, block->res_w, hidden, out, block->res_bias, 0);
        else memcpy(out, in, sizeof(uint16_t) * (size_t)(n * hidden));
        for (int64_t i = 0; i < n * hidden; i += 16) {
            __m512 sum = _mm512_add_ps(widen(out + i), widen_vec((__m256i)_mm512_cvtneps_pbh(silu16(widen(lin + i)))));
            _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(sum));
        }
        in = out;
    }
    linear(in, n, hidden, lm_w, vocab, logits, lm_bias, 0);
    for (int64_t r = 0; r < n; r++) {
        const uint16_t *row = logits + r * vocab;
        int64_t *best = ids + r * top;
        int64_t kept = 0;
        float bar = -INFINITY; /* the kept's lowest logit once `top` are kept: only a higher one enters */
        for (int64_t j = 0; j < vocab; j += 16) {
            __mmask16 valid = tail_mask(vocab - j);
            __m512 v = widen_vec(_mm256_maskz_loadu_epi16(valid, row + j));
            __mmask16 over = kept < top ? valid : _mm512_mask_cmp_ps_mask(valid, v, _mm512_set1_ps(bar), _CMP_GT_OQ);
            while (over) {
                int lane = __builtin_ctz(over);
                over &= over - 1;
                float value = bf16_to_f32(row[j + lane]);
                if (kept == top && !(value > bar)) continue;
                int64_t at = kept < top ? kept++ : top - 1; /* a full list drops its last */
                while (at > 0 && value > bf16_to_f32(row[best[at - 1]])) { best[at] = best[at - 1]; at--; } /* ties: the lower id first */
                best[at] = j + lane;
                if (kept == top) bar = bf16_to_f32(row[best[top - 1]]);
            }
        }
        float high = bf16_to_f32(row[best[0]]);
        __m512 total = _mm512_setzero_ps();
        for (int64_t j = 0; j < vocab; j += 16) {
            __mmask16 valid = tail_mask(vocab - j);
            __m512 v = widen_vec(_mm256_maskz_loadu_epi16(valid, row + j));
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(v, _mm512_set1_ps(high)))));
        }
        float sum = _mm512_reduce_add_ps(total);
        for (int64_t t = 0; t < top; t++)
            probs[r * top + t] = _mm512_cvtss_f32(exp16(_mm512_set1_ps(bf16_to_f32(row[best[t]]) - high))) / sum;
    }
    free(state[0]); free(state[1]); free(lin); free(logits);
}

/* What VDPBF16PS computes here at most, in FLOP/s (2 per multiply-add): every thread runs
 * `iterations` rounds of 12 independent dot products on registers (enough chains to hide the
 * instruction's latency), nothing read from memory. scripts/bench_engine.py sets a verify's
 * compute floor from it: n rows of a product need 2 * n * weights FLOP, whatever the engine. */
double dot_peak(int64_t iterations) {
    double start = omp_get_wtime();
    float sink = 0.0f;
    int threads = 1;
    #pragma omp parallel reduction(+ : sink)
    {
        #pragma omp single
        threads = omp_get_num_threads();
        __m512 acc[12];
        for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
        __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3c003c00);
        for (int64_t it = 0; it < iterations; it++) {
            for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
            __asm__ volatile("" : "+v"(a)); /* the operands are not loop invariants: the rounds are not folded */
        }
        for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(acc[i]);
    }
    double seconds = omp_get_wtime() - start;
    return sink == -1.0f ? 0.0 : (double)threads * (double)iterations * 12.0 * 64.0 / seconds;
}

/* A decoder layer's weights as layer_step reads them: one per layer of a stack (stack_step). */
typedef struct {
    const uint16_t *norm1, *norm2, *qkv_w, *qkv_bias, *o_w, *o_bias, *gate_up_w, *gate_up_bias, *down_w, *down_bias;
    float eps1, eps2;
} layer_weights;

/* Every layer of a Llama stack in one call: layer_step layer after layer (its output the next
 * one's input, through two scratch rows buffers), layer l's keys and values at kv + l * 2 *
 * kv_heads * capacity * dim (engine/kv.py StaticKV: [layers, 2, kv_heads, capacity, dim]).
 * Saves the Python call per layer and transformers' forward around them: 1-1.8 ms of a 7-11 ms
 * SmolLM2 step (docs/engine.md). The layers share their shapes (the caller checks). With
 * `final_norm`, the stack's final RMSNorm too (in place on out): one Python call fewer a step,
 * each costing tens of microseconds once the step's weights have pushed Python out of the caches. */
void stack_step(const layer_weights *layers, int64_t count, const uint16_t *hidden, int64_t rows, int64_t width, uint16_t *out,
                int64_t heads, int64_t kv_heads, int64_t dim, int64_t intermediate, const uint16_t *cos, const uint16_t *sin,
                uint16_t *kv, int64_t capacity, const int64_t *slots, int64_t span, const uint16_t *mask, int64_t mask_row,
                float scale, const uint16_t *final_norm, float final_eps) {
    uint16_t *scratch[2] = {(uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * width)),
                            (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(rows * width))};
    int64_t plane = kv_heads * capacity * dim;
    uint16_t *causal = !mask && rows > 1 ? causal_mask(slots, rows, span) : 0; /* once for every layer */
    if (causal) mask = causal, mask_row = span;
    const uint16_t *in = hidden;
    for (int64_t l = 0; l < count; l++) {
        const layer_weights *w = layers + l;
        uint16_t *dst = l == count - 1 ? out : scratch[l % 2]; /* never the buffer `in` is */
        layer_step(in, rows, width, dst, w->norm1, w->eps1, w->norm2, w->eps2, w->qkv_w, w->qkv_bias, w->o_w, w->o_bias,
                   w->gate_up_w, w->gate_up_bias, w->down_w, w->down_bias, heads, kv_heads, dim, intermediate, cos, sin,
                   kv + 2 * l * plane, kv + (2 * l + 1) * plane, capacity, slots, span, mask, mask_row, scale);
        in = dst;
    }
    if (final_norm) rms_norm(out, rows, width, final_norm, final_eps, out); /* row by row: in place is safe */
    free(scratch[0]);
    free(scratch[1]);
    free(causal);
}
