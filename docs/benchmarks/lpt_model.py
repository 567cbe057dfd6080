"""A model of the tail a causal grid leaves, for the program order of attngen's forward and
dQ grids (attngen.tilemap.query_tile_order). CPU only.

    python docs/benchmarks/lpt_model.py

Programs start in list order on SLOTS = 132 multiprocessors x occupancy; each takes the
first free slot and runs for its key tiles plus a fixed cost of 2 tiles (prologue and
epilogue). Query tile i of a causal grid visits (i + 1) * BLOCK_Q / BLOCK_KV key tiles.
Three orders of H = 16 heads: launch order (heads one after another, first tile first),
last tile first within each head, and last tile first across all heads. Printed: the
finish time of the last program, in key tiles, and the ideal (total work / slots).
"""

import heapq


def finish(lengths, slots: int, fixed: float = 2.0) -> float:
    free = [0.0] * slots
    for w in lengths:
        heapq.heappush(free, heapq.heappop(free) + w + fixed)
    return max(free)


def main() -> None:
    heads, sms = 16, 132
    print(f"{'T':>6} {'tile':>8} {'CTAs/SM':>7} {'ideal':>7} {'launch':>7} {'per head':>8} {'all heads':>9}")
    for t in (4096, 16384):
        for bq, bkv, occ in ((128, 64, 1), (128, 64, 2), (64, 128, 1)):
            n = t // bq
            work = [(i + 1) * bq / bkv for i in range(n)]
            launch = [w for _ in range(heads) for w in work]
            per_head = [w for _ in range(heads) for w in reversed(work)]
            across = [w for w in reversed(work) for _ in range(heads)]
            slots = sms * occ
            ideal = sum(w + 2 for w in launch) / slots
            print(f"{t:>6} {bq:>4}x{bkv:<3} {occ:>7} {ideal:7.0f} {finish(launch, slots):7.0f} "
                  f"{finish(per_head, slots):8.0f} {finish(across, slots):9.0f}")


if __name__ == "__main__":
    main()
