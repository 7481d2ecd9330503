/* This processor's float32 multiply-add peak on one core: the ceiling under every matrix product
 * of a train step (benchmarks/RESULTS.md, "Twenty-fifth session"). x86-64 with AVX2 and FMA, or
 * AVX-512; GCC:
 *
 *     gcc -O3 -march=native -o /tmp/cpu_peak benchmarks/cpu_peak.c && /tmp/cpu_peak
 *
 * Twelve independent chains of fused multiply-adds on vectors of the processor's width (GCC vector
 * extensions: 16 floats with AVX-512, else 8), enough chains to hide the instruction's latency,
 * held in registers; best of 5. Run one copy per core at once for the whole processor. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under a strict -std */
#include <stdio.h>
#include <time.h>

#if !defined(__FMA__) && !defined(__AVX512F__)
#error "needs fused multiply-adds: compile with -march=native (or -mavx2 -mfma)"
#endif
#ifdef __AVX512F__
enum { LANES = 16 };
#else
enum { LANES = 8 }; /* AVX2's width */
#endif
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
enum { CHAINS = 12 };

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* One multiply-add on a chain; the empty asm keeps the compiler from merging or hoisting chains. */
#define STEP(x)                                  \
    do {                                         \
        x = x * scale + shift;                   \
        __asm__ volatile("" : "+v"(x));          \
    } while (0)

/* a * b + c as one FMA also under a strict -std, where GCC otherwise keeps them apart */
__attribute__((optimize("fp-contract=fast"))) int main(void) {
    const long rounds = 400000000 / CHAINS;
    vec scale, shift, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
    for (int lane = 0; lane < LANES; lane++) {
        scale[lane] = 0.9999999f;
        shift[lane] = 1e-7f;
        a0[lane] = 0, a1[lane] = 1, a2[lane] = 2, a3[lane] = 3, a4[lane] = 4, a5[lane] = 5;
        a6[lane] = 6, a7[lane] = 7, a8[lane] = 8, a9[lane] = 9, a10[lane] = 10, a11[lane] = 11;
    }
    double best = 1e30;
    for (int repeat = 0; repeat < 5; repeat++) {
        double start = seconds();
        for (long r = 0; r < rounds; r++) {
            STEP(a0); STEP(a1); STEP(a2); STEP(a3); STEP(a4); STEP(a5);
            STEP(a6); STEP(a7); STEP(a8); STEP(a9); STEP(a10); STEP(a11);
        }
        double elapsed = seconds() - start;
        if (elapsed < best) best = elapsed;
    }
    vec sum = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    float checksum = 0; /* the chains' results are used */
    for (int lane = 0; lane < LANES; lane++) checksum += sum[lane];
    printf("float32 multiply-adds, one core: %.1f GMAC/s (checksum %g)\n",
           (double)rounds * CHAINS * LANES / best / 1e9, checksum);
    return 0;
}
