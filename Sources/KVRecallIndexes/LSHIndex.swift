import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// SimHash locality-sensitive hashing for inner product (as MagicPIG uses it): L tables of K random
/// hyperplanes each; a key's code in a table is the K sign bits of (key - mean) . hyperplane.
/// A query's candidates are the keys sharing its bucket in at least `minCollisions` tables; they
/// are re-ranked exactly.
///
/// Keys are centred by their mean so the hyperplanes cut through the key cloud rather than miss it
/// (attention keys share a large common component). Signs do not depend on the query's norm, so
/// queries need no normalising for bucketing. Each table is a CSR bucket array: `2^K + 1`
/// offsets into one flat id buffer; no per-vector allocation.
public final class LSHIndex: BuildableIndex, @unchecked Sendable {
    public static let kind = IndexKind.lsh
    public static let formatVersion = 2
    public let dimension: Int
    public private(set) var count = 0
    public private(set) var mapSnapshot: MapIdentity?
    public let tables: Int
    public let bits: Int
    public let seed: UInt64
    public var threads: Int
    /// `tables * bits` hyperplanes, row-major `[tables * bits, dimension]`.
    private(set) var hyperplanes: [Float]
    /// Mean of the keys of the first add.
    private(set) var mean: [Float] = []
    /// Per table: `2^bits + 1` offsets into `bucketIDs[table]`.
    private(set) var bucketOffsets: [[Int32]] = []
    /// Per table: key positions, bucket after bucket (views of the stored section once loaded).
    private(set) var bucketIDs: [SectionArray<Int32>] = []

    public init(dimension: Int, tables: Int = 150, bits: Int = 10, seed: UInt64 = 42, threads: Int = 2) throws {
        guard (1...1024).contains(tables) else { throw IndexError.invalidParameter("tables must be in 1...1024 (got \(tables))") }
        guard (1...16).contains(bits) else { throw IndexError.invalidParameter("bits must be in 1...16 (got \(bits))") }
        guard dimension > 0 else { throw IndexError.invalidParameter("dimension must be positive") }
        self.dimension = dimension
        self.tables = tables
        self.bits = bits
        self.seed = seed
        self.threads = max(1, threads)
        var rng = SeededGenerator(seed: seed)
        hyperplanes = (0..<(tables * bits * dimension)).map { _ in gaussian(&rng) }
        bucketOffsets = [[Int32]](repeating: [Int32](repeating: 0, count: (1 << bits) + 1), count: tables)
        bucketIDs = [SectionArray<Int32>](repeating: [], count: tables)
    }

    var projections: Int { tables * bits }

    /// Codes of `n` centred f32 rows: `[n, tables]`, each the packed sign bits of one table.
    private func codes(rows: UnsafePointer<Float>, n: Int, scratch: UnsafeMutablePointer<Float>, into out: UnsafeMutablePointer<UInt16>) {
        hyperplanes.withUnsafeBufferPointer { h in
            // One row (a query, a decode-time key): gemv; a one-row sgemm packs every hyperplane per call.
            if n == 1 { BLAS.gemv(n: projections, k: dimension, a: h.baseAddress!, x: rows, y: scratch) }
            else { BLAS.scoresNT(m: n, n: projections, k: dimension, a: rows, b: h.baseAddress!, c: scratch) }
        }
        for r in 0..<n {
            let p = scratch + r * projections
            for t in 0..<tables {
                var code: UInt16 = 0
                for b in 0..<bits where p[t * bits + b] > 0 { code |= 1 << UInt16(b) }
                out[r * tables + t] = code
            }
        }
    }

    /// True once the centring mean is known.
    public var isTrained: Bool { !mean.isEmpty }

    /// Learns the centring mean from keys `range`.
    public func train(keys: VectorView, range: Range<Int>, queries: VectorView? = nil) throws {
        guard keys.dimension == dimension else { throw IndexError.dimensionMismatch(expected: dimension, actual: keys.dimension) }
        guard count == 0 else { throw IndexError.invalidParameter("the LSH index already holds keys; its centring mean stays") }
        guard !range.isEmpty, range.upperBound <= keys.count else {
            throw IndexError.invalidParameter("LSH trains on a non-empty range within \(keys.count) keys, got \(range)")
        }
        mean = meanKey(keys, range: range)
    }

    public func add(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)? = nil) throws {
        try checkAdd(keys: keys, range: range, name: "LSH")
        let n = range.count
        guard n > 0 else { return }
        if !isTrained { try train(keys: keys, range: range) }
        // Hash the new keys in chunks spread over the threads.
        var codes = [UInt16](repeating: 0, count: n * tables)
        let chunkRows = 256
        let done = Counter()
        let plan = ChunkPlan(count: n, chunk: chunkRows, threads: threads)
        codes.withUnsafeMutableBufferPointer { out in
            let codes = out.baseAddress!
            plan.run(scratch: chunkRows * (dimension + projections)) { t, chunks, buffer in
                let rows = buffer, scratch = buffer + chunkRows * dimension
                for (_, part) in chunks {
                    let lo = range.lowerBound + part.lowerBound, m = part.count
                    for i in 0..<m {
                        keys.decodeRow(lo + i, into: rows + i * dimension)
                        for j in 0..<dimension { rows[i * dimension + j] -= mean[j] }
                    }
                    self.codes(rows: rows, n: m, scratch: scratch, into: codes + part.lowerBound * tables)
                    if t == 0 { progress?(min(n, done.add(m * plan.workers)), n) }
                }
            }
        }
        // A few keys (decode-time upkeep) wait in the tail, matched code by code at search; the
        // tail joins the tables once it reaches 1/16 of them (at least 64 keys). The merge rewrites
        // every table, so it is spread over the next adds a few tables at a time (one step paying
        // for all 150 tables was a 1 ms spike per head); a large add finishes it at once.
        tailCodes += codes
        count = range.upperBound
        if n >= 64 {  // a large add (a build, a catch-up): everything at once
            mergeTail()
        } else {
            if !isMerging, count - merged >= max(64, merged / 16) {
                mergingUpTo = count
                let spread = mergeSpread(tail: count - merged)
                tablesPerAdd = (tables + spread - 1) / spread
            }
            if isMerging { mergeTables(tablesPerAdd) }
        }
        progress?(n, n)
    }

    /// Keys in every CSR table (`0..<merged`); keys `merged..<count` are in the tail.
    private(set) var merged = 0
    /// A merge in progress: tables `0..<mergedTables` also hold keys `merged..<mergingUpTo`.
    private(set) var mergingUpTo = 0
    private(set) var mergedTables = 0
    private var tablesPerAdd = 1
    /// Codes of the tail's keys, `[count - merged, tables]`.
    private(set) var tailCodes: [UInt16] = []

    var isMerging: Bool { mergingUpTo > merged }

    /// The adds a merge of `tail` keys is spread over: half the adds until the next merge is due.
    private func mergeSpread(tail: Int) -> Int { max(1, max(64, (merged + tail) / 16) / 2) }

    /// Moves the whole tail into the tables (finishing a merge in progress first).
    func mergeTail() {
        if isMerging { mergeTables(tables - mergedTables) }
        guard count > merged else { return }
        mergingUpTo = count
        mergeTables(tables)
    }

    /// Merges keys `merged..<mergingUpTo` into the next `n` tables (old ids first, so buckets stay
    /// in id order); once every table holds them, they leave the tail.
    private func mergeTables(_ n: Int) {
        let first = merged, newCount = mergingUpTo - merged
        let range = mergedTables..<min(tables, mergedTables + n)
        let buckets = 1 << bits
        var newOffsets = [[Int32]](repeating: [], count: range.count)
        var newIDs = [SectionArray<Int32>](repeating: [], count: range.count)
        tailCodes.withUnsafeBufferPointer { codesBuffer in
        let codes = codesBuffer.baseAddress!
        newOffsets.withUnsafeMutableBufferPointer { offsetsOut in
            newIDs.withUnsafeMutableBufferPointer { idsOut in
                // Threads only for a merge of many tables at once (a build's add); one step's share runs inline.
                ChunkPlan(count: range.count, chunk: 1, threads: range.count >= 32 ? threads : 1).run { _, owned in for (i, _) in owned {
                    let t = range.lowerBound + i
                    var counts = [Int32](repeating: 0, count: buckets)
                    let old = bucketOffsets[t]
                    for b in 0..<buckets { counts[b] = old[b + 1] - old[b] }
                    for r in 0..<newCount { counts[Int(codes[r * tables + t])] += 1 }
                    var offsets = [Int32](repeating: 0, count: buckets + 1)
                    for b in 0..<buckets { offsets[b + 1] = offsets[b] + counts[b] }
                    var ids = [Int32](repeating: 0, count: Int(offsets[buckets]))
                    var fill = offsets
                    bucketIDs[t].withUnsafeBufferPointer { oldIDs in
                        for b in 0..<buckets {
                            for j in Int(old[b])..<Int(old[b + 1]) { ids[Int(fill[b])] = oldIDs[j]; fill[b] += 1 }
                        }
                    }
                    for r in 0..<newCount {
                        let b = Int(codes[r * tables + t])
                        ids[Int(fill[b])] = Int32(first + r)
                        fill[b] += 1
                    }
                    offsetsOut[i] = offsets
                    idsOut[i] = SectionArray(ids)
                } }
            }
        }
        }
        for (i, t) in range.enumerated() {
            bucketOffsets[t] = newOffsets[i]
            bucketIDs[t] = newIDs[i]
        }
        mergedTables = range.upperBound
        if mergedTables == tables {
            tailCodes.removeFirst(newCount * tables)
            merged = mergingUpTo
            mergedTables = 0
        }
    }

    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        let m = try checkSearch(queries, k: k, keys: keys, name: "the LSH index")
        guard (1...tables).contains(parameters.lsh.minCollisions) else {
            throw IndexError.invalidParameter("min-collisions \(parameters.lsh.minCollisions) must be in 1...\(tables) (the table count)")
        }
        var results = SearchResults(k: k, queryCount: m)
        results.stats.keyCount = count
        let need = UInt16(parameters.lsh.minCollisions)
        let computed = Counter()
        let tail = count - merged
        results.ids.withUnsafeMutableBufferPointer { ids in
            results.scores.withUnsafeMutableBufferPointer { scores in
                ChunkPlan.contiguous(count: m, threads: parameters.threads).run { _, chunks in
                    var hits = [UInt16](repeating: 0, count: count)
                    var touched: [Int32] = []
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: projections)
                    var code = [UInt16](repeating: 0, count: tables)
                    defer { scratch.deallocate() }
                    var top = TopK<Int>(k: k)
                    var local = 0
                    for (_, range) in chunks { for q in range {
                        let query = queries.baseAddress! + q * dimension
                        code.withUnsafeMutableBufferPointer { self.codes(rows: query, n: 1, scratch: scratch, into: $0.baseAddress!) }
                        touched.removeAll(keepingCapacity: true)
                        top.reset()
                        for tb in 0..<tables {
                            let offsets = bucketOffsets[tb]
                            let b = Int(code[tb])
                            bucketIDs[tb].withUnsafeBufferPointer { bucket in
                                for j in Int(offsets[b])..<Int(offsets[b + 1]) {
                                    let id = Int(bucket[j])
                                    if hits[id] == 0 { touched.append(Int32(id)) }
                                    hits[id] &+= 1
                                }
                            }
                        }
                        // The tail's keys, code by code: in every table, or, for keys a merge in
                        // progress has put into the first tables, in the tables it has not reached.
                        tailCodes.withUnsafeBufferPointer { tailCodes in code.withUnsafeBufferPointer { code in
                            for r in 0..<tail {
                                let id = merged + r
                                let row = tailCodes.baseAddress! + r * tables
                                var collisions: UInt16 = 0
                                for tb in (id < mergingUpTo ? mergedTables : 0)..<tables where row[tb] == code[tb] { collisions += 1 }
                                guard collisions > 0 else { continue }
                                if hits[id] == 0 { touched.append(Int32(id)) }
                                hits[id] &+= collisions
                            }
                        } }
                        touched.sort()
                        for id in touched {
                            let i = Int(id)
                            if hits[i] >= need {
                                top.push(keys.score(query: query, row: i), i)
                                local += 1
                            }
                            hits[i] = 0
                        }
                        for (j, hit) in top.sorted().enumerated() {
                            ids[q * k + j] = hit.id
                            scores[q * k + j] = hit.score
                        }
                    } }
                    _ = computed.add(local)
                }
            }
        }
        results.stats.distanceComputations = computed.value
        results.stats.auxiliaryComputations = m * projections
        return results
    }

    // MARK: Persistence

    /// The tables with the tail merged in (the stored form has no tail).
    public func sections() -> [String: [UInt8]] {
        mergeTail()
        var meta = ByteWriter()
        for v in [dimension, count, tables, bits] { meta.write(Int64(v)) }
        meta.write(seed)
        var planes = ByteWriter()
        planes.write(array: hyperplanes)
        planes.write(array: mean)
        var buckets = ByteWriter()
        for t in 0..<tables {
            buckets.write(array: bucketOffsets[t])
            buckets.write(alignedArray: bucketIDs[t])
        }
        return ["meta": meta.bytes, "planes": planes.bytes, "buckets": buckets.bytes]
    }

    public convenience init(sections: IndexSections) throws {
        let (v, seed) = try readSection(sections, "meta", of: .lsh) { meta in
            (try (0..<4).map { _ in Int(try meta.read(Int64.self)) }, try meta.read(UInt64.self))
        }
        guard (1...65536).contains(v[0]), (0...Int(Int32.max)).contains(v[1]), (1...1024).contains(v[2]), (1...16).contains(v[3]) else {
            throw IndexError.corrupt("LSH meta out of range")
        }
        try self.init(dimension: v[0], tables: v[2], bits: v[3], seed: seed)
        (hyperplanes, mean) = try readSection(sections, "planes", of: .lsh) { try ($0.readFloatArray(), $0.readFloatArray()) }
        guard hyperplanes.count == tables * bits * dimension, mean.count == dimension || (v[1] == 0 && mean.isEmpty),
              hyperplanes.allSatisfy(\.isFinite), mean.allSatisfy(\.isFinite) else {
            throw IndexError.corrupt("LSH hyperplanes or mean have the wrong size, or are not finite")
        }
        let count = v[1]
        try readSection(sections, "buckets", of: .lsh) { reader in
            for t in 0..<tables {
                let offsets = try reader.readArray(Int32.self)
                let ids = try reader.readAlignedArray(Int32.self)
                guard offsets.count == (1 << bits) + 1, offsets.first == 0, Int(offsets.last!) == ids.count, ids.count == count,
                      zip(offsets, offsets.dropFirst()).allSatisfy({ $0 <= $1 }),
                      ids.withUnsafeBufferPointer({ $0.allSatisfy { $0 >= 0 && Int($0) < count } }) else {
                    throw IndexError.corrupt("LSH table \(t) is inconsistent")
                }
                bucketOffsets[t] = offsets
                bucketIDs[t] = ids
            }
        }
        self.count = count
        merged = count
        mergingUpTo = count
        mapSnapshot = sections.mapSnapshot
    }
}

/// A standard normal sample (Box–Muller) from the seeded generator.
func gaussian(_ rng: inout SeededGenerator) -> Float {
    let u1 = max(Double(rng.next() >> 11) / Double(1 << 53), 1e-300)
    let u2 = Double(rng.next() >> 11) / Double(1 << 53)
    return Float((-2 * log(u1)).squareRoot() * cos(2 * .pi * u2))
}

/// A thread-safe running total.
final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var total = 0
    var value: Int { lock.lock(); defer { lock.unlock() }; return total }
    @discardableResult
    func add(_ n: Int) -> Int { lock.lock(); defer { lock.unlock() }; total += n; return total }
}

extension LSHIndex {
    /// LSH's entry in the catalog: L tables of K bits; min-collisions calibrated from 8 down to 1
    /// (fewer collisions, more candidates). On heads whose queries sit far from their keys (Gemma
    /// 3's: recall@400 0.03 at 2, 0.21 at 1) no value reaches the target and the head selects by
    /// an exact scan instead.
    public static let descriptor = IndexDescriptor(
        kind: .lsh, type: LSHIndex.self, knob: .minCollisions,
        make: { d, _, p in try LSHIndex(dimension: d, tables: p.tables, bits: p.bits, seed: p.seed, threads: p.threads) },
        ladder: { index, _ in [8, 6, 4, 3, 2, 1].filter { $0 <= ((index as? LSHIndex)?.tables ?? 1) } },
        describe: { "min collisions \($0.lsh.minCollisions)" })
}
