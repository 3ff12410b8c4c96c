// Host-side tiling of the GPTQ dequant kernel (csrc/ascend/kernels/gptq_dequant.cpp).
//
// Plain C++17, no CANN dependency: it is compiled and unit-tested on machines without the toolkit
// (csrc/ascend/tests/test_tiling.cpp), and its Python twin (python/gptq_ascend/backends/ascend/
// tiling.py, plan_tiling: the plan the Triton kernel follows) is checked against it field by field.
//
// The problem: a GPTQ layer with K inputs, N outputs, `bits` in {4, 8}; qweight int32 [ceil(K/pf), N]
// packs pf = 32/bits consecutive input rows per word, least-significant bits first. Groups are
// contiguous runs of `groupSize` input rows (act-order layers are permuted to that shape at load time).
//
// The work unit is a tile: `rows` packed rows (<= tileRows) x `cols` columns (<= tileCols). A tile never
// crosses a group boundary, so it needs exactly one row of scales and one row of zeros. Tiles are
// numbered row-tile-major, then split into contiguous, balanced ranges over the vector cores (the
// first `extraTiles` cores take one more tile). On the core, one tile is: CopyIn (words, scale row,
// zero row; double-buffered) -> for each of the pf lanes j: Compute (shift out the j-th code of every
// word, cast to float, subtract the zero, multiply by the scale, cast to fp16/bf16) -> CopyOut (the
// rows pf*w + j of the output, a strided copy; double-buffered).
//
// Unified Buffer use per core (all buffers rounded up to 32 bytes):
//   words in      2 x tileRows*tileCols*4        (TQue VECIN, double buffer)
//   scale+zero in 2 x 2 x tileCols*2              (TQue VECIN, double buffer, fp16/bf16 rows)
//   out           2 x tileRows*tileCols*outBytes  (TQue VECOUT, double buffer)
//   shifted codes tileRows*tileCols*4             (TBuf VECCALC, uint32)
//   float work    tileRows*tileCols*4             (TBuf VECCALC, float)
//   scale, zero   2 x tileCols*4                  (TBuf VECCALC, float)
#pragma once

#include <cstdint>

#if defined(GPTQ_ASCEND_DEVICE)
#define GPTQ_HD __aicore__ inline
#else
#define GPTQ_HD inline
#endif

namespace gptq_ascend {

constexpr uint32_t kUbBytesA2 = 192 * 1024;   // Unified Buffer per AI core on Atlas A2/A3 (910B/910C)
constexpr uint32_t kUbReserveBytes = 8 * 1024; // left to the runtime/compiler by the launcher's plan
constexpr uint32_t kAlignBytes = 32;          // DataCopy / UB address granularity
constexpr uint32_t kColAlign = 16;            // tileCols multiple: 32 bytes of fp16/bf16 output
constexpr uint32_t kMaxTileCols = 512;
constexpr uint32_t kMaxTileRows = 64;
constexpr uint32_t kMaxVectorElems = 255 * 64;  // one vector call: <= 255 repeats of 256 bytes (fp32)
constexpr uint32_t kMaxCores = 65535;

enum class TilingStatus : int32_t {
    kOk = 0,
    kBadBits = 1,         // bits must be 4 or 8
    kEmpty = 2,           // K or N is 0
    kBadGroup = 3,        // several groups whose size is not a multiple of the pack factor
    kBadCores = 4,        // core count 0 or too large
    kUbTooSmall = 5,      // not even a 1 x 16 tile fits
    kBadDtype = 6,        // output element size must be 2 (fp16/bf16)
};

struct DequantTiling {
    // The problem.
    uint32_t k = 0;
    uint32_t n = 0;
    uint32_t bits = 0;
    uint32_t packFactor = 0;   // codes per int32 word
    uint32_t groupSize = 0;    // input rows per group (effective: K when the layer has one group)
    uint32_t numGroups = 0;
    uint32_t packedRows = 0;   // ceil(K / packFactor)
    uint32_t groupWords = 0;   // packed rows per group (packedRows when numGroups == 1)
    uint32_t outBytes = 0;     // bytes per output element (2)
    // The tiles.
    uint32_t tileRows = 0;
    uint32_t tileCols = 0;     // multiple of kColAlign
    uint32_t colTiles = 0;
    uint32_t lastCols = 0;     // columns of the last column tile (the N tail)
    uint32_t rowTilesPerGroup = 0;
    uint32_t rowTiles = 0;
    uint32_t totalTiles = 0;
    // The cores.
    uint32_t usedCores = 0;
    uint32_t tilesPerCore = 0;
    uint32_t extraTiles = 0;   // cores [0, extraTiles) take tilesPerCore + 1 tiles
    // Unified Buffer, bytes per buffer (each already rounded to kAlignBytes).
    uint32_t wordBufBytes = 0;    // one words-in buffer
    uint32_t paramBufBytes = 0;   // one scale (or zero) row in the input dtype
    uint32_t outBufBytes = 0;     // one output buffer
    uint32_t calcBufBytes = 0;    // shifted codes, and again float work
    uint32_t paramCalcBytes = 0;  // scale (or zero) row as float
    uint32_t ubBytes = 0;         // total
};

struct TileCoords {
    uint32_t firstWord = 0;  // first packed row
    uint32_t rows = 0;       // packed rows in this tile
    uint32_t group = 0;      // the group every row of the tile belongs to
    uint32_t firstCol = 0;
    uint32_t cols = 0;
};

GPTQ_HD uint32_t CeilDiv(uint32_t a, uint32_t b) { return (a + b - 1) / b; }
GPTQ_HD uint32_t AlignUp(uint32_t a, uint32_t b) { return CeilDiv(a, b) * b; }

// Tile t (0 <= t < totalTiles) -> its coordinates. Row-tile-major: consecutive tiles of one core walk
// along N first, so the scale/zero rows of a group are re-read from L2, not from HBM.
GPTQ_HD TileCoords TileAt(const DequantTiling& p, uint32_t t)
{
    TileCoords c;
    uint32_t rowTile = t / p.colTiles;
    uint32_t colTile = t % p.colTiles;
    c.group = rowTile / p.rowTilesPerGroup;
    uint32_t inGroup = rowTile % p.rowTilesPerGroup;
    c.firstWord = c.group * p.groupWords + inGroup * p.tileRows;
    uint32_t groupEnd = (c.group + 1) * p.groupWords;
    if (groupEnd > p.packedRows) {
        groupEnd = p.packedRows;
    }
    c.rows = groupEnd - c.firstWord;
    if (c.rows > p.tileRows) {
        c.rows = p.tileRows;
    }
    c.firstCol = colTile * p.tileCols;
    c.cols = (colTile + 1 == p.colTiles) ? p.lastCols : p.tileCols;
    return c;
}

// Output rows written by lane j of a tile: the word rows firstWord .. firstWord+n-1 give input rows
// packFactor*w + j; the last word of the layer may hold fewer than packFactor codes (K % pf != 0).
GPTQ_HD uint32_t LaneRows(const DequantTiling& p, const TileCoords& c, uint32_t lane)
{
    uint32_t rows = c.rows;
    uint32_t tailCodes = p.k % p.packFactor;
    if (tailCodes != 0 && c.firstWord + c.rows == p.packedRows && lane >= tailCodes) {
        rows -= 1;
    }
    return rows;
}

// The tile range of core `core`: [*first, *first + *count).
GPTQ_HD void CoreRange(const DequantTiling& p, uint32_t core, uint32_t* first, uint32_t* count)
{
    if (core >= p.usedCores) {
        *first = p.totalTiles;
        *count = 0;
        return;
    }
    uint32_t extra = core < p.extraTiles ? core : p.extraTiles;
    *first = core * p.tilesPerCore + extra;
    *count = p.tilesPerCore + (core < p.extraTiles ? 1u : 0u);
}

// UB bytes the kernel needs for a tile shape (see the table at the top of this file).
GPTQ_HD void UbLayout(uint32_t tileRows, uint32_t tileCols, uint32_t outBytes, DequantTiling* p)
{
    p->wordBufBytes = AlignUp(tileRows * tileCols * 4u, kAlignBytes);
    p->paramBufBytes = AlignUp(tileCols * 2u, kAlignBytes);
    p->outBufBytes = AlignUp(tileRows * tileCols * outBytes, kAlignBytes);
    p->calcBufBytes = AlignUp(tileRows * tileCols * 4u, kAlignBytes);
    p->paramCalcBytes = AlignUp(tileCols * 4u, kAlignBytes);
    p->ubBytes = 2u * p->wordBufBytes + 2u * 2u * p->paramBufBytes + 2u * p->outBufBytes +
                 2u * p->calcBufBytes + 2u * p->paramCalcBytes;
}

// Every derived field of a plan from the problem and the chosen tile shape. ComputeTiling (host) chooses
// tileRows/tileCols and calls this; the kernel receives only (k, n, bits, groupSize, tileRows, tileCols,
// usedCores) as launch arguments and calls it again on the device, so both sides agree by construction.
// groupSize must be the effective one (1 <= groupSize <= k), and a multiple of 32/bits unless >= k.
GPTQ_HD void DeriveTiling(uint32_t k, uint32_t n, uint32_t bits, uint32_t groupSize, uint32_t outBytes,
                          uint32_t tileRows, uint32_t tileCols, uint32_t coreNum, DequantTiling* p)
{
    p->k = k;
    p->n = n;
    p->bits = bits;
    p->packFactor = 32u / bits;
    p->outBytes = outBytes;
    p->packedRows = CeilDiv(k, p->packFactor);
    p->groupSize = groupSize;
    p->numGroups = CeilDiv(k, groupSize);
    p->groupWords = p->numGroups == 1 ? p->packedRows : groupSize / p->packFactor;
    p->tileRows = tileRows;
    p->tileCols = tileCols;
    p->colTiles = CeilDiv(n, tileCols);
    p->lastCols = n - (p->colTiles - 1u) * tileCols;
    p->rowTilesPerGroup = CeilDiv(p->groupWords, tileRows);
    uint32_t lastGroupWords = p->packedRows - (p->numGroups - 1u) * p->groupWords;
    p->rowTiles = (p->numGroups - 1u) * p->rowTilesPerGroup + CeilDiv(lastGroupWords, tileRows);
    p->totalTiles = p->rowTiles * p->colTiles;
    p->usedCores = coreNum < p->totalTiles ? coreNum : p->totalTiles;
    p->tilesPerCore = p->totalTiles / p->usedCores;
    p->extraTiles = p->totalTiles % p->usedCores;
    UbLayout(tileRows, tileCols, outBytes, p);
}

#if !defined(GPTQ_ASCEND_DEVICE)
// The Unified Buffer per AI core of the SoC the kernels are compiled for (SOC_VERSION, e.g.
// "Ascend910B3"), by name prefix; 0 for a SoC they do not cover. Only Atlas A2/A3: the kernel relies on
// DataCopyPad, which needs them. The Python twin is tiling.ub_bytes_for_soc (compared by the host test).
inline uint32_t UbBytesForSoc(const char* soc)
{
    struct Entry { const char* prefix; uint32_t ub; };
    static const Entry kTable[] = {
        {"Ascend910B", kUbBytesA2},     // Atlas A2: 910B1..910B4
        {"Ascend910_93", kUbBytesA2},   // Atlas A3: 910C (Ascend910_9391, _9392, ...)
    };
    for (const Entry& e : kTable) {
        const char* a = e.prefix;
        const char* b = soc;
        while (*a != '\0' && b != nullptr && *b == *a) {
            ++a;
            ++b;
        }
        if (*a == '\0') {
            return e.ub;
        }
    }
    return 0;
}

// Plan the kernel for one layer. group_size <= 0 means one group over all K (GPTQ's -1).
// ub_bytes: Unified Buffer bytes the kernel may use; core_num: vector cores to spread over.
TilingStatus ComputeTiling(uint32_t k, uint32_t n, uint32_t bits, int64_t group_size, uint32_t out_bytes,
                           uint32_t core_num, uint32_t ub_bytes, DequantTiling* out);
const char* TilingStatusMessage(TilingStatus s);
#endif

}  // namespace gptq_ascend
