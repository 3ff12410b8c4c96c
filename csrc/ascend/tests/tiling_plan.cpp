// Prints the host tiling as JSON, one line per query, so the Python twin (plan_tiling in
// python/gptq_ascend/backends/ascend/tiling.py) can be compared with it field by field.
// `tiling_plan --soc NAME...` prints UbBytesForSoc per name instead.
// stdin: lines "K N bits group_size out_bytes cores ub_bytes"; stdout: one JSON object per line.
#include <cinttypes>
#include <cstdio>
#include <string>

#include "../tiling.h"

using namespace gptq_ascend;

int main(int argc, char** argv)
{
    // `tiling_plan --soc NAME...`: UbBytesForSoc per name, one JSON object per line.
    if (argc > 1 && std::string(argv[1]) == "--soc") {
        for (int i = 2; i < argc; ++i) {
            std::printf("{\"soc\": \"%s\", \"ub\": %u}\n", argv[i], UbBytesForSoc(argv[i]));
        }
        return 0;
    }
    unsigned k, n, bits, outBytes, cores, ub;
    long long group;
    while (std::scanf("%u %u %u %lld %u %u %u", &k, &n, &bits, &group, &outBytes, &cores, &ub) == 7) {
        DequantTiling p;
        TilingStatus st = ComputeTiling(k, n, bits, group, outBytes, cores, ub, &p);
        if (st != TilingStatus::kOk) {
            std::printf("{\"status\": %d, \"message\": \"%s\"}\n", static_cast<int>(st), TilingStatusMessage(st));
            continue;
        }
        std::printf(
            "{\"status\": 0, \"k\": %u, \"n\": %u, \"bits\": %u, \"pack_factor\": %u, \"group_size\": %u, "
            "\"num_groups\": %u, \"packed_rows\": %u, \"group_words\": %u, \"out_bytes\": %u, "
            "\"tile_rows\": %u, \"tile_cols\": %u, \"col_tiles\": %u, \"last_cols\": %u, "
            "\"row_tiles_per_group\": %u, \"row_tiles\": %u, \"total_tiles\": %u, \"used_cores\": %u, "
            "\"tiles_per_core\": %u, \"extra_tiles\": %u, \"ub_bytes\": %u}\n",
            p.k, p.n, p.bits, p.packFactor, p.groupSize, p.numGroups, p.packedRows, p.groupWords, p.outBytes,
            p.tileRows, p.tileCols, p.colTiles, p.lastCols, p.rowTilesPerGroup, p.rowTiles, p.totalTiles,
            p.usedCores, p.tilesPerCore, p.extraTiles, p.ubBytes);
    }
    return 0;
}
