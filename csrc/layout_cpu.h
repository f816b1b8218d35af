/* The prepacked weight layout of the CPU kernels (csrc/gemm_cpu.c): its only description.
 *
 * A weight of N rows (output features) x K (input features), group size g, is cut into row blocks of
 * MIX_RB = 16 rows and, along K, into G groups; each (row block, group) pair is one section, stored at
 * blob + (rb * G + j) * section_bytes, so one row block's groups lie back to back and a row block is
 * read once, in order. A section is a whole number of 64-byte cache lines:
 *
 *   codes  Lp / MIX_K_PER_STEP(bits) steps of MIX_STEP_BYTES (= 16 rows x 4 bytes) each; in step s,
 *          bytes 4r .. 4r+3 belong to row r (Lp = g rounded up to MIX_K_ALIGN):
 *            4-bit: byte 4r+i = code[r, 8s+i] | code[r, 8s+4+i] << 4   (unsigned codes 0..15)
 *            8-bit: byte 4r+i = int8 w[r, 4s+i]
 *          so that one 32-bit lane holds 4 (8-bit) or 2 x 4 (4-bit) consecutive k of one row: a
 *          u8 x s8 dot product of 4 bytes per lane (AVX2 maddubs + madd, AVX-512 VNNI vpdpbusd) needs
 *          no horizontal reduction.
 *   tail   the weight scale of each row (float32 [16], the section's last 64 bytes); 4-bit sections put
 *          the zero points (int32 [16]) before it: mix_cpu_tail. 8-bit: the scales alone (64 bytes: at one
 *          token the 8-bit layers stream their weights from memory, and a second line per section was 3%
 *          of the bytes).
 *            4-bit: y = sw * sa * (sum_k code * a  -  z * sum_k a);   8-bit: y = sw * sa * sum_k w * a
 * Padding (rows past N, k past the group's end) holds weight 0 (4-bit: code = zero point) and scale 0.
 * The layout is an in-memory cache rebuilt from the canonical codes (ops.QuantizedWeight.cpu_blob),
 * never saved, so it may change between versions. */
#ifndef MIXLLM_LAYOUT_CPU_H
#define MIXLLM_LAYOUT_CPU_H
#include <stdint.h>

#define MIX_RB               16 /* rows per block: 16 int32 lanes of one 512-bit vector */
#define MIX_K_ALIGN          8  /* a group's k is padded to a multiple of this (one 4-bit step) */
#define MIX_STEP_BYTES       64 /* bytes per step: MIX_RB rows x 4 bytes */
#define MIX_K_PER_STEP(bits) ((bits) == 4 ? 8 : 4)
#define MIX_CACHE_LINE       64

typedef struct {           /* the tail of a 4-bit section; an 8-bit section's tail is its scale[] alone */
    int32_t izero[MIX_RB]; /* zero point */
    float scale[MIX_RB];   /* weight scale of the row in this group; 0 for padding rows */
} mix_cpu_tail;

_Static_assert(sizeof(mix_cpu_tail) == 128, "mix_cpu_tail: 16 int32 + 16 float32, no padding");
_Static_assert(sizeof(mix_cpu_tail) % MIX_CACHE_LINE == 0, "sections must stay whole cache lines");
_Static_assert(MIX_RB * sizeof(float) == MIX_CACHE_LINE, "an 8-bit tail (the scales) is one cache line");

/* Bytes of a section's tail: 4-bit mix_cpu_tail (zero points, scales), 8-bit the scales alone. */
static inline int64_t mix_cpu_tail_bytes(int bits) {
    return bits == 4 ? (int64_t)sizeof(mix_cpu_tail) : MIX_RB * (int64_t)sizeof(float);
}
_Static_assert(MIX_STEP_BYTES == MIX_RB * 4, "a step holds 4 bytes of each row");

/* Bytes of the codes of one section (Lp: padded group length, a multiple of MIX_K_ALIGN). */
static inline int64_t mix_cpu_code_bytes(int bits, int64_t Lp) { return Lp / MIX_K_PER_STEP(bits) * MIX_STEP_BYTES; }
#endif
