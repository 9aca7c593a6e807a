/* One instruction-set variant of the panel-layout kernels, included once per variant by cpu_w4a8.c with
 *   V(name)        the variant's function name suffix
 *   TGT            its target attribute string
 *   DOT4(acc, w, x) acc (8 × int32) += Σ_{j<4} w.u8[4i+j] · x.s8[4i+j] for each lane i: vpdpbusd where the variant
 *                  has VNNI; vpmaddubsw + vpmaddwd(1) + vpaddd on plain AVX2 (exact: a pair sum is at most
 *                  2 · 15 · 127 = 3810, far inside int16, because the codes are 4-bit).
 * The layout and the arithmetic are described in cpu_w4a8.c. */

#define VT __attribute__((target(TGT)))

/* W4A8 tile: MT activation rows × 2 panels (16 outputs). Per k-step of 8 columns each panel's 32 bytes give two
 * u8 vectors (low and high nibbles of each byte), multiplied against two 4-byte broadcasts of the row's permuted
 * int8 codes. Integer sums run over one activation block, then go to float with both scales and the zero point. */
VT static inline __attribute__((always_inline)) void V(a8_tile)(const A8Job *j, int64_t p, int64_t m0, const int MT,
                                                                const int NP) {
    const int64_t K = j->K, Np = j->Np, steps = j->B / 8;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 accf[4][2];
    for (int i = 0; i < MT; i++)
        for (int q = 0; q < NP; q++) accf[i][q] = _mm256_setzero_ps();
    for (int64_t b = 0; b < j->nb; b++) {
        const int64_t g = b / j->bpg;
        __m256i acc[4][2];
        for (int i = 0; i < MT; i++)
            for (int q = 0; q < NP; q++) acc[i][q] = _mm256_setzero_si256();
        const uint8_t *w0 = j->qw + ((p * (K / 8)) + b * steps) * 32;
        const int8_t *xr = j->xq + m0 * K + b * j->B;
        for (int64_t s = 0; s < steps; s++) {
            __m256i lo[2], hi[2];
            for (int q = 0; q < NP; q++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w0 + (q * (K / 8) + s) * 32));
                lo[q] = _mm256_and_si256(v, low4);
                hi[q] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            }
            for (int i = 0; i < MT; i++) {
                int32_t xa4, xb4;
                memcpy(&xa4, xr + i * K + s * 8, 4);
                memcpy(&xb4, xr + i * K + s * 8 + 4, 4);
                const __m256i xa = _mm256_set1_epi32(xa4), xb = _mm256_set1_epi32(xb4);
                for (int q = 0; q < NP; q++) {
                    DOT4(acc[i][q], lo[q], xa);
                    DOT4(acc[i][q], hi[q], xb);
                }
            }
        }
        for (int q = 0; q < NP; q++) {
            const int64_t n0 = (p + q) * 8;
            const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(j->scales + g * Np + n0)));
            const __m256 zw = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(j->zeros + g * Np + n0))));
            for (int i = 0; i < MT; i++) {
                const int64_t mb = (m0 + i) * j->nb + b;
                __m256 d = _mm256_fnmadd_ps(zw, _mm256_set1_ps((float)j->isum[mb]), _mm256_cvtepi32_ps(acc[i][q]));
                accf[i][q] = _mm256_fmadd_ps(d, _mm256_mul_ps(sw, _mm256_set1_ps(j->xs[mb])), accf[i][q]);
            }
        }
    }
    for (int i = 0; i < MT; i++)
        for (int q = 0; q < NP; q++) store_out(j->y, j->bf16, (m0 + i) * j->N, (p + q) * 8, j->N, accf[i][q]);
}

VT static void V(a8_panels)(const A8Job *j, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1;) {
        const int NP = p + 2 <= p1 ? 2 : 1;
        int64_t m0 = 0;
        if (NP == 2) {
            for (; m0 + 4 <= j->M; m0 += 4) V(a8_tile)(j, p, m0, 4, 2);
            for (; m0 < j->M; m0++) V(a8_tile)(j, p, m0, 1, 2);
        } else {
            for (; m0 + 4 <= j->M; m0 += 4) V(a8_tile)(j, p, m0, 4, 1);
            for (; m0 < j->M; m0++) V(a8_tile)(j, p, m0, 1, 1);
        }
        p += NP;
    }
}

/* Decode (int16 activations): MT rows × NP panels. Each panel's 32 bytes are 16 int16 lanes of 4 nibbles; nibble e
 * of lanes (2i, 2i+1) holds columns 2e and 2e+1 of output i, so (v >> 4e) & 15 multiplied with vpmaddwd against the
 * broadcast int16 pair x[2e], x[2e+1] adds both into lane i: no horizontal sums anywhere. */
VT static inline __attribute__((always_inline)) void V(w16_tile)(const A16Job *j, int64_t p, int64_t m0, const int MT,
                                                                 const int NP) {
    const int64_t K = j->K, Np = j->Np, steps = j->B / 8;
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    __m256 accf[4][4];
    for (int i = 0; i < MT; i++)
        for (int q = 0; q < NP; q++) accf[i][q] = _mm256_setzero_ps();
    for (int64_t b = 0; b < j->nb; b++) {
        const int64_t g = b / j->bpg;
        __m256i acc[4][4];
        for (int i = 0; i < MT; i++)
            for (int q = 0; q < NP; q++) acc[i][q] = _mm256_setzero_si256();
        const uint8_t *w0 = j->qw + ((p * (K / 8)) + b * steps) * 32;
        const int16_t *xr = j->xq + m0 * K + b * j->B;
        for (int64_t s = 0; s < steps; s++) {
            __m256i e[4][4];
            for (int q = 0; q < NP; q++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w0 + (q * (K / 8) + s) * 32));
                e[q][0] = _mm256_and_si256(v, low4);
                e[q][1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                e[q][2] = _mm256_and_si256(_mm256_srli_epi16(v, 8), low4);
                e[q][3] = _mm256_srli_epi16(v, 12);
            }
            for (int i = 0; i < MT; i++) {
                const int16_t *xs = xr + i * K + s * 8;
                for (int h = 0; h < 4; h++) {
                    int32_t pair;
                    memcpy(&pair, xs + 2 * h, 4);
                    const __m256i xv = _mm256_set1_epi32(pair);
                    for (int q = 0; q < NP; q++) acc[i][q] = _mm256_add_epi32(acc[i][q], _mm256_madd_epi16(e[q][h], xv));
                }
            }
        }
        for (int q = 0; q < NP; q++) {
            const int64_t n0 = (p + q) * 8;
            const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(j->scales + g * Np + n0)));
            const __m256 zw = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(j->zeros + g * Np + n0))));
            for (int i = 0; i < MT; i++) {
                const int64_t mb = (m0 + i) * j->nb + b;
                __m256 d = _mm256_fnmadd_ps(zw, _mm256_set1_ps((float)j->isum[mb]), _mm256_cvtepi32_ps(acc[i][q]));
                accf[i][q] = _mm256_fmadd_ps(d, _mm256_mul_ps(sw, _mm256_set1_ps(j->xs[mb])), accf[i][q]);
            }
        }
    }
    for (int i = 0; i < MT; i++)
        for (int q = 0; q < NP; q++) store_out(j->y, j->bf16, (m0 + i) * j->N, (p + q) * 8, j->N, accf[i][q]);
}

VT static void V(w16_panels)(const A16Job *j, int64_t p0, int64_t p1) {
    int64_t p = p0;
    if (j->M == 1) {
        for (; p + 4 <= p1; p += 4) V(w16_tile)(j, p, 0, 1, 4);
        for (; p < p1; p++) V(w16_tile)(j, p, 0, 1, 1);
        return;
    }
    for (; p + 2 <= p1; p += 2) {
        int64_t m0 = 0;
        for (; m0 + 2 <= j->M; m0 += 2) V(w16_tile)(j, p, m0, 2, 2);
        if (m0 < j->M) V(w16_tile)(j, p, m0, 1, 2);
    }
    for (; p < p1; p++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= j->M; m0 += 4) V(w16_tile)(j, p, m0, 4, 1);
        for (; m0 < j->M; m0++) V(w16_tile)(j, p, m0, 1, 1);
    }
}

#undef VT
