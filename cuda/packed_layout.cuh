// The packed weight layout that cuda/pack_weights.cu writes and every GEMM kernel reads
// (docs/kernels.md, "Packed weight layout"). One header so that no kernel spells the sizes
// out by hand.
//
// Codes, uint4 units: 16-row tile rt, pair of k-steps kp (64 padded columns), word v, lane:
//     wpack[((rt * Kp/64 + kp) * VEC + v) * 32 + lane],   VEC = bits / 4
// Lane 4*gid + tig holds rows gid and gid+8 of the tile in the m16n8k32 A-fragment order; inside
// each k-step of 32 the stored k order is permuted (logical 4t+i <-> stored 8t+i, 16+4t+i <->
// 8t+4+i for thread t of a quad) so that a thread's B fragment is 8 contiguous activation bytes.
// 4-bit: one word holds two k-steps of one lane (x, y: k-step 2kp; z, w: k-step 2kp+1; low
// nibbles = fragment registers a0/a1, high nibbles a2/a3). 8-bit: word v of kp holds k-step 2kp+v.
// Padding (rows >= N, columns past a group's end) holds the zero point: weight 0.
// Meta: one MetaRecord per (16-row tile, group j), at record index rt * G + j.
#pragma once
#include "mixllm_cuda.h"
#include <stdint.h>

namespace mixc_layout {

constexpr int TILE_ROWS = 16;       /* weight rows per tile (the MMA's M) */
constexpr int KSTEP = 32;           /* columns per m16n8k32 k-step */
constexpr int KSTAGE = MIXC_KSTAGE; /* padded columns per stage: one scale per stage */
constexpr int KSTEPS_PER_STAGE = KSTAGE / KSTEP;
constexpr int WORD_BYTES = 16; /* one uint4 per lane */
constexpr int WARP_WORD_BYTES = 32 * WORD_BYTES;

/* uint4 words per lane per stage of one 16-row tile: 2 at 4 bits, 4 at 8 bits. */
constexpr int words_per_stage(int bits) { return bits / 2; }

/* Scales and zero points of one 16-row tile in one group. */
struct MetaRecord {
    float scale[TILE_ROWS];  /* float32 scale of each row (0 for rows >= N) */
    uint8_t zero[TILE_ROWS]; /* zero point of each row (0 for 8-bit rows) */
};
static_assert(sizeof(MetaRecord) == 80, "the meta record is 80 bytes: 16 float scales + 16 zeros");
static_assert(sizeof(MetaRecord) % 16 == 0, "meta records are copied in 16-byte pieces");
constexpr int META_BYTES = (int)sizeof(MetaRecord);
constexpr int META_WORDS = META_BYTES / 16;
constexpr int META_ZERO_OFFSET = (int)(TILE_ROWS * sizeof(float)); /* byte offset of zero[] */

} // namespace mixc_layout
