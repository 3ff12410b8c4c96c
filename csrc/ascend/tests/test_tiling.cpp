// Unit test of the host tiling (csrc/ascend/tiling.h), built with plain g++/CMake, no CANN.
//
// What it checks, for many shapes (tails in K and N, ragged last groups, 4 and 8 bits), Unified Buffer
// sizes and every core count from 1 to 40:
//  * the plan fits the UB, keeps 32-byte alignment and the vector-repeat limit;
//  * the tiles cover every (packed row, column) exactly once, and no tile crosses a group;
//  * every tile is assigned to exactly one core, in contiguous ranges that differ by at most one tile;
//  * the strided copies the kernel issues have legal parameters;
//  * the kernel's on-device DeriveTiling from its 7 launch scalars reproduces the host plan exactly;
//  * a CPU emulation of the kernel's tile loop (same TileAt/LaneRows/CoreRange, same per-lane shift
//    and row placement) produces exactly the naive dequantization, with NaN-poisoned output;
//  * bad inputs give the documented status.
// Prints one line per failure and a closing "N passed, N failed" line; exit status 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../tiling.h"

using namespace gptq_ascend;

static int g_pass = 0;
static int g_fail = 0;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (cond) {                                              \
            ++g_pass;                                            \
        } else {                                                 \
            ++g_fail;                                            \
            if (g_fail <= 50) {                                  \
                std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
                std::printf(__VA_ARGS__);                        \
                std::printf("\n");                               \
            }                                                    \
        }                                                        \
    } while (0)

struct Shape {
    uint32_t k, n, bits;
    int64_t group;
};

static std::string Describe(const Shape& s, uint32_t cores, uint32_t ub)
{
    char buf[160];
    std::snprintf(buf, sizeof(buf), "K=%u N=%u bits=%u group=%lld cores=%u ub=%u", s.k, s.n, s.bits,
                  static_cast<long long>(s.group), cores, ub);
    return buf;
}

// Structural checks of one plan.
static void CheckPlan(const Shape& s, uint32_t cores, uint32_t ub)
{
    DequantTiling p;
    TilingStatus st = ComputeTiling(s.k, s.n, s.bits, s.group, 2, cores, ub, &p);
    std::string what = Describe(s, cores, ub);
    CHECK(st == TilingStatus::kOk, "%s: status %s", what.c_str(), TilingStatusMessage(st));
    if (st != TilingStatus::kOk) {
        return;
    }
    CHECK(p.ubBytes <= ub, "%s: ub %u > %u", what.c_str(), p.ubBytes, ub);
    CHECK(p.tileCols % kColAlign == 0 && p.tileCols > 0, "%s: tileCols %u", what.c_str(), p.tileCols);
    CHECK(p.tileCols <= AlignUp(s.n, kColAlign), "%s: tileCols %u wider than N", what.c_str(), p.tileCols);
    CHECK(p.wordBufBytes % kAlignBytes == 0 && p.paramBufBytes % kAlignBytes == 0 &&
              p.outBufBytes % kAlignBytes == 0 && p.calcBufBytes % kAlignBytes == 0 &&
              p.paramCalcBytes % kAlignBytes == 0,
          "%s: unaligned buffer", what.c_str());
    CHECK(p.tileRows >= 1 && p.tileRows <= p.groupWords && p.tileRows <= kMaxTileRows, "%s: tileRows %u",
          what.c_str(), p.tileRows);
    CHECK(p.tileRows * p.tileCols <= kMaxVectorElems, "%s: %u elements per vector call", what.c_str(),
          p.tileRows * p.tileCols);
    CHECK(p.usedCores >= 1 && p.usedCores <= cores && p.usedCores <= p.totalTiles, "%s: usedCores %u",
          what.c_str(), p.usedCores);
    CHECK(p.lastCols >= 1 && p.lastCols <= p.tileCols, "%s: lastCols %u", what.c_str(), p.lastCols);

    // The kernel gets (k, n, bits, groupSize, tileRows, tileCols, usedCores) and re-derives the rest.
    DequantTiling d;
    DeriveTiling(p.k, p.n, p.bits, p.groupSize, p.outBytes, p.tileRows, p.tileCols, p.usedCores, &d);
    CHECK(std::memcmp(&d, &p, sizeof(d)) == 0, "%s: device-side DeriveTiling differs from the host plan",
          what.c_str());

    // Every tile exactly once over the cores, contiguous and balanced.
    std::vector<int> tileOwner(p.totalTiles, -1);
    uint32_t next = 0;
    uint32_t minCount = 0xFFFFFFFFu;
    uint32_t maxCount = 0;
    for (uint32_t c = 0; c < cores; ++c) {
        uint32_t first = 0;
        uint32_t count = 0;
        CoreRange(p, c, &first, &count);
        if (c >= p.usedCores) {
            CHECK(count == 0, "%s: idle core %u got %u tiles", what.c_str(), c, count);
            continue;
        }
        CHECK(first == next, "%s: core %u starts at %u, expected %u", what.c_str(), c, first, next);
        CHECK(count >= 1, "%s: used core %u has no tile", what.c_str(), c);
        minCount = count < minCount ? count : minCount;
        maxCount = count > maxCount ? count : maxCount;
        for (uint32_t t = first; t < first + count && t < p.totalTiles; ++t) {
            CHECK(tileOwner[t] == -1, "%s: tile %u assigned twice", what.c_str(), t);
            tileOwner[t] = static_cast<int>(c);
        }
        next = first + count;
    }
    CHECK(next == p.totalTiles, "%s: cores cover %u of %u tiles", what.c_str(), next, p.totalTiles);
    CHECK(maxCount - minCount <= 1, "%s: unbalanced %u..%u", what.c_str(), minCount, maxCount);

    // Every (packed row, column) exactly once; no tile crosses a group; copy parameters legal.
    std::vector<uint8_t> seen(static_cast<size_t>(p.packedRows) * s.n, 0);
    bool overlap = false;
    bool crosses = false;
    bool badCopy = false;
    for (uint32_t t = 0; t < p.totalTiles; ++t) {
        TileCoords c = TileAt(p, t);
        if (c.rows == 0 || c.rows > p.tileRows || c.cols == 0 || c.cols > p.tileCols ||
            c.firstWord + c.rows > p.packedRows || c.firstCol + c.cols > s.n) {
            badCopy = true;
            continue;
        }
        for (uint32_t w = c.firstWord; w < c.firstWord + c.rows; ++w) {
            for (uint32_t lane = 0; lane < p.packFactor; ++lane) {
                uint32_t row = w * p.packFactor + lane;
                if (row < s.k && row / p.groupSize != c.group) {
                    crosses = true;
                }
            }
            for (uint32_t col = c.firstCol; col < c.firstCol + c.cols; ++col) {
                uint8_t& v = seen[static_cast<size_t>(w) * s.n + col];
                overlap |= v != 0;
                v = 1;
            }
        }
        // CopyIn of the words: UB row stride tileCols*4 bytes, each block padded to 32 bytes.
        uint32_t inBlock = AlignUp(c.cols * 4u, kAlignBytes);
        badCopy |= inBlock > p.tileCols * 4u || (p.tileCols * 4u - inBlock) % kAlignBytes != 0;
        // CopyOut of one lane: UB row stride tileCols*2 bytes.
        uint32_t outBlock = AlignUp(c.cols * p.outBytes, kAlignBytes);
        badCopy |= outBlock > p.tileCols * p.outBytes || (p.tileCols * p.outBytes - outBlock) % kAlignBytes != 0;
        for (uint32_t lane = 0; lane < p.packFactor; ++lane) {
            uint32_t lr = LaneRows(p, c, lane);
            badCopy |= lr > c.rows || lr + 1 < c.rows || lr > 4095;
        }
    }
    bool complete = true;
    for (uint8_t v : seen) {
        complete &= v == 1;
    }
    CHECK(!overlap, "%s: tiles overlap", what.c_str());
    CHECK(complete, "%s: tiles leave holes", what.c_str());
    CHECK(!crosses, "%s: a tile crosses a group boundary", what.c_str());
    CHECK(!badCopy, "%s: illegal tile or copy parameters", what.c_str());
}

// CPU emulation of the kernel: the same loops as GptqDequantKernel::Process, with plain arrays.
// Returns the number of writes that fell outside the [K, N] output.
static size_t EmulateKernel(const DequantTiling& p, uint32_t cores, const std::vector<uint32_t>& qweight,
                            const std::vector<float>& zeros, const std::vector<float>& scales,
                            std::vector<float>& out)
{
    size_t outside = 0;
    for (uint32_t core = 0; core < cores; ++core) {
        uint32_t first = 0;
        uint32_t count = 0;
        CoreRange(p, core, &first, &count);
        for (uint32_t t = first; t < first + count; ++t) {
            TileCoords c = TileAt(p, t);
            // CopyIn: words [rows, cols] with UB row stride tileCols.
            std::vector<uint32_t> words(static_cast<size_t>(p.tileRows) * p.tileCols, 0xDEADBEEFu);
            for (uint32_t r = 0; r < c.rows; ++r) {
                for (uint32_t j = 0; j < c.cols; ++j) {
                    words[r * p.tileCols + j] = qweight[static_cast<size_t>(c.firstWord + r) * p.n + c.firstCol + j];
                }
            }
            for (uint32_t lane = 0; lane < p.packFactor; ++lane) {
                uint32_t lr = LaneRows(p, c, lane);
                // Compute: (word << (32 - bits*(lane+1))) >> (32 - bits), logical shifts.
                for (uint32_t r = 0; r < lr; ++r) {
                    for (uint32_t j = 0; j < c.cols; ++j) {
                        uint32_t w = words[r * p.tileCols + j];
                        uint32_t code = (w << (32u - p.bits * (lane + 1))) >> (32u - p.bits);
                        float z = zeros[static_cast<size_t>(c.group) * p.n + c.firstCol + j];
                        float sc = scales[static_cast<size_t>(c.group) * p.n + c.firstCol + j];
                        // CopyOut: row packFactor*(firstWord + r) + lane.
                        size_t row = static_cast<size_t>(c.firstWord + r) * p.packFactor + lane;
                        if (row >= p.k || c.firstCol + j >= p.n) {
                            ++outside;
                            continue;
                        }
                        out[row * p.n + c.firstCol + j] = (static_cast<float>(code) - z) * sc;
                    }
                }
            }
        }
    }
    return outside;
}

static void CheckEmulation(const Shape& s, uint32_t cores, uint32_t ub, std::mt19937& rng)
{
    DequantTiling p;
    if (ComputeTiling(s.k, s.n, s.bits, s.group, 2, cores, ub, &p) != TilingStatus::kOk) {
        CHECK(false, "%s: no plan", Describe(s, cores, ub).c_str());
        return;
    }
    std::uniform_int_distribution<uint32_t> word(0, 0xFFFFFFFFu);
    std::uniform_int_distribution<int> zero(0, (1 << s.bits) - 1);
    std::uniform_real_distribution<float> scale(0.001f, 0.1f);
    std::vector<uint32_t> qweight(static_cast<size_t>(p.packedRows) * s.n);
    for (auto& w : qweight) {
        w = word(rng);
    }
    std::vector<float> zeros(static_cast<size_t>(p.numGroups) * s.n);
    std::vector<float> scales(zeros.size());
    for (size_t i = 0; i < zeros.size(); ++i) {
        zeros[i] = static_cast<float>(zero(rng));
        scales[i] = scale(rng);
    }
    std::vector<float> out(static_cast<size_t>(s.k) * s.n, NAN);
    size_t outside = EmulateKernel(p, cores, qweight, zeros, scales, out);
    CHECK(outside == 0, "%s: %zu writes outside the output", Describe(s, cores, ub).c_str(), outside);
    // Naive: code of input row k is bits [bits*(k%pf), bits*(k%pf+1)) of word k/pf.
    uint32_t pf = 32 / s.bits;
    uint32_t gs = p.groupSize;
    size_t bad = 0;
    for (uint32_t k = 0; k < s.k; ++k) {
        for (uint32_t n = 0; n < s.n; ++n) {
            uint32_t code = (qweight[static_cast<size_t>(k / pf) * s.n + n] >> (s.bits * (k % pf))) &
                            ((1u << s.bits) - 1u);
            uint32_t g = k / gs;
            float want = (static_cast<float>(code) - zeros[static_cast<size_t>(g) * s.n + n]) *
                         scales[static_cast<size_t>(g) * s.n + n];
            float got = out[static_cast<size_t>(k) * s.n + n];
            bad += !(got == want);
        }
    }
    CHECK(bad == 0, "%s: %zu of %zu elements differ from the naive dequant", Describe(s, cores, ub).c_str(), bad,
          static_cast<size_t>(s.k) * s.n);
}

static void CheckErrors()
{
    DequantTiling p;
    CHECK(ComputeTiling(128, 64, 3, 32, 2, 8, kUbBytesA2, &p) == TilingStatus::kBadBits, "3-bit accepted");
    CHECK(ComputeTiling(128, 64, 2, 32, 2, 8, kUbBytesA2, &p) == TilingStatus::kBadBits, "2-bit accepted");
    CHECK(ComputeTiling(0, 64, 8, 32, 2, 8, kUbBytesA2, &p) == TilingStatus::kEmpty, "K=0 accepted");
    CHECK(ComputeTiling(128, 0, 8, 32, 2, 8, kUbBytesA2, &p) == TilingStatus::kEmpty, "N=0 accepted");
    CHECK(ComputeTiling(128, 64, 4, 36, 2, 8, kUbBytesA2, &p) == TilingStatus::kBadGroup, "int4 group 36 accepted");
    CHECK(ComputeTiling(128, 64, 8, 36, 2, 8, kUbBytesA2, &p) == TilingStatus::kOk, "int8 group 36 refused");
    CHECK(ComputeTiling(128, 64, 8, 32, 2, 0, kUbBytesA2, &p) == TilingStatus::kBadCores, "0 cores accepted");
    CHECK(ComputeTiling(128, 64, 8, 32, 2, 8, 100, &p) == TilingStatus::kUbTooSmall, "100-byte UB accepted");
    CHECK(ComputeTiling(128, 64, 8, 32, 4, 8, kUbBytesA2, &p) == TilingStatus::kBadDtype, "fp32 output accepted");
    // One group, however K relates to the pack factor: K=100 int4 (last word half full), group -1.
    CHECK(ComputeTiling(100, 64, 4, -1, 2, 8, kUbBytesA2, &p) == TilingStatus::kOk && p.numGroups == 1 &&
              p.groupWords == 13,
          "K=100 int4 one group: groups %u words %u", p.numGroups, p.groupWords);
    // group >= K is one group too.
    CHECK(ComputeTiling(64, 64, 8, 128, 2, 8, kUbBytesA2, &p) == TilingStatus::kOk && p.numGroups == 1,
          "group > K: groups %u", p.numGroups);
}

static void CheckKnownPlans()
{
    DequantTiling p;
    // Qwen3-1.7B down_proj, int8, group 128, 40 vector cores (Ascend 910B3).
    CHECK(ComputeTiling(6144, 2048, 8, 128, 2, 40, kUbBytesA2, &p) == TilingStatus::kOk, "down_proj");
    CHECK(p.groupWords == 32 && p.tileCols == 512 && p.tileRows == 16 && p.colTiles == 4 && p.rowTiles == 96 &&
              p.totalTiles == 384 && p.usedCores == 40 && p.tilesPerCore == 9 && p.extraTiles == 24,
          "down_proj plan: words %u cols %u rows %u colTiles %u rowTiles %u tiles %u cores %u per %u extra %u",
          p.groupWords, p.tileCols, p.tileRows, p.colTiles, p.rowTiles, p.totalTiles, p.usedCores, p.tilesPerCore,
          p.extraTiles);
    CHECK(p.ubBytes == 20u * 16 * 512 + 16u * 512, "down_proj ub %u", p.ubBytes);
    // int4, group 128: 16 words per group.
    CHECK(ComputeTiling(2048, 6144, 4, 128, 2, 40, kUbBytesA2, &p) == TilingStatus::kOk && p.groupWords == 16 &&
              p.tileRows == 16 && p.tileCols == 512 && p.totalTiles == 16 * 12,
          "int4 gate plan: words %u rows %u cols %u tiles %u", p.groupWords, p.tileRows, p.tileCols, p.totalTiles);
}

int main()
{
    std::vector<Shape> shapes = {
        {2048, 4096, 8, 128}, {6144, 2048, 8, 128}, {2048, 6144, 4, 128}, {2048, 2048, 4, -1},
        {256, 64, 8, 32},     {256, 64, 4, 32},     {192, 48, 8, 64},     {128, 1, 8, 32},
        {128, 15, 4, 32},     {128, 17, 8, 64},     {160, 100, 8, 128},   {160, 100, 4, 128},
        {100, 33, 8, -1},     {100, 33, 4, -1},     {7, 5, 8, -1},        {1, 1, 4, -1},
        {1, 1, 8, 128},       {96, 520, 8, 36},     {4096, 1000, 4, 64},  {640, 4097, 8, 128},
        {8192, 24, 8, 8192},  {3000, 130, 8, 1000}, {4096, 16, 4, 4096},  {512, 12288, 4, 256},
    };
    const uint32_t ubs[] = {kUbBytesA2, 64 * 1024, 16 * 1024, 4 * 1024};
    for (const Shape& s : shapes) {
        for (uint32_t ub : ubs) {
            for (uint32_t cores = 1; cores <= 40; ++cores) {
                CheckPlan(s, cores, ub);
            }
        }
    }
    std::mt19937 rng(1234);
    for (const Shape& s : shapes) {
        if (static_cast<uint64_t>(s.k) * s.n > (1u << 22)) {
            continue;
        }
        for (uint32_t cores : {1u, 3u, 7u, 20u, 40u}) {
            CheckEmulation(s, cores, kUbBytesA2, rng);
            CheckEmulation(s, cores, 4 * 1024, rng);
        }
    }
    CheckErrors();
    CheckKnownPlans();
    std::printf("tiling: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail == 0 ? 0 : 1;
}
