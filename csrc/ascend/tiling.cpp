// Host-side tiling of the GPTQ dequant kernel: see tiling.h. Mirrored by plan_tiling() in
// python/gptq_ascend/backends/ascend/tiling.py; tests/ascend/test_tiling_host.py checks the two agree.
#include "tiling.h"

namespace gptq_ascend {

namespace {

// Largest tileRows <= limit that fits, preferring divisors of groupWords (no short tile per group).
uint32_t ChooseRows(uint32_t groupWords, uint32_t tileCols, uint32_t outBytes, uint32_t ubBytes)
{
    uint32_t limit = groupWords < kMaxTileRows ? groupWords : kMaxTileRows;
    while (limit > 0) {
        DequantTiling probe;
        UbLayout(limit, tileCols, outBytes, &probe);
        if (probe.ubBytes <= ubBytes && limit * tileCols <= kMaxVectorElems) {
            break;
        }
        --limit;
    }
    if (limit == 0) {
        return 0;
    }
    uint32_t best = 1;
    for (uint32_t r = limit; r >= 1; --r) {
        if (groupWords % r == 0) {
            best = r;
            break;
        }
    }
    // A divisor far below the limit costs more than one short tile per group.
    return (2 * best >= limit) ? best : limit;
}

}  // namespace

TilingStatus ComputeTiling(uint32_t k, uint32_t n, uint32_t bits, int64_t group_size, uint32_t out_bytes,
                           uint32_t core_num, uint32_t ub_bytes, DequantTiling* out)
{
    if (bits != 4 && bits != 8) {
        return TilingStatus::kBadBits;
    }
    if (k == 0 || n == 0) {
        return TilingStatus::kEmpty;
    }
    if (out_bytes != 2) {
        return TilingStatus::kBadDtype;
    }
    if (core_num == 0 || core_num > kMaxCores) {
        return TilingStatus::kBadCores;
    }
    const uint32_t packFactor = 32 / bits;
    const uint32_t packedRows = CeilDiv(k, packFactor);
    const uint32_t groupSize = (group_size <= 0 || static_cast<uint64_t>(group_size) >= k)
                                   ? k
                                   : static_cast<uint32_t>(group_size);
    const uint32_t numGroups = CeilDiv(k, groupSize);
    uint32_t groupWords = packedRows;
    if (numGroups > 1) {
        if (groupSize % packFactor != 0) {
            return TilingStatus::kBadGroup;
        }
        groupWords = groupSize / packFactor;
    }

    // Columns: as wide as N (rounded to 16) up to kMaxTileCols, narrower only if a 1-row tile overflows.
    uint32_t cols = AlignUp(n, kColAlign);
    if (cols > kMaxTileCols) {
        cols = kMaxTileCols;
    }
    uint32_t rows = 0;
    while (cols >= kColAlign) {
        rows = ChooseRows(groupWords, cols, out_bytes, ub_bytes);
        if (rows > 0) {
            break;
        }
        cols -= kColAlign;
    }
    if (rows == 0) {
        return TilingStatus::kUbTooSmall;
    }
    DequantTiling p;
    DeriveTiling(k, n, bits, groupSize, out_bytes, rows, cols, core_num, &p);
    *out = p;
    return TilingStatus::kOk;
}

const char* TilingStatusMessage(TilingStatus s)
{
    switch (s) {
        case TilingStatus::kOk: return "ok";
        case TilingStatus::kBadBits: return "bits must be 4 or 8";
        case TilingStatus::kEmpty: return "in_features and out_features must be positive";
        case TilingStatus::kBadGroup: return "group_size must be a multiple of 32/bits when the layer has several groups";
        case TilingStatus::kBadCores: return "core count must be in [1, 65535]";
        case TilingStatus::kUbTooSmall: return "the Unified Buffer cannot hold a 1 x 16 tile";
        case TilingStatus::kBadDtype: return "output dtype must be float16 or bfloat16";
    }
    return "unknown tiling status";
}

}  // namespace gptq_ascend
