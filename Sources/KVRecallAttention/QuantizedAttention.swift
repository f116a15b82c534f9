import CKernels
import Dispatch
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes

/// Knobs of the `quantized` method.
public struct QuantizedParameters: Sendable, Equatable {
    /// Positions per query head taken from the code scan and attended exactly (the union over the
    /// group's heads, beyond sinks and window).
    public var candidates = 128
    /// Whether every other coded position contributes through its codes (score and value); false
    /// drops them (a sharp head loses nothing).
    public var tail = true
    /// A group of positions contributes through each position's value codes when some head gives
    /// it at least this multiple of its mean tail mass per group; lighter groups contribute through
    /// their mean value (their weights still from each position's key codes). 0: every group through
    /// its codes.
    public var tailDetail: Float = 0.5
    /// A head whose tail holds less than this share of the mass of its exact part (a sharp head)
    /// drops its tail: its values are not read (an output error of about this share at most).
    public var tailFloor: Float = 0.002
    public init() {}

    public func validate() throws {
        guard candidates >= 0 else { throw IndexError.invalidParameter("quantized candidates must be non-negative (got \(candidates))") }
        guard tailDetail >= 0 && tailDetail.isFinite else { throw IndexError.invalidParameter("tail detail must be non-negative (got \(tailDetail))") }
        guard tailFloor >= 0 && tailFloor < 1 else { throw IndexError.invalidParameter("tail floor must be in [0, 1) (got \(tailFloor))") }
    }
}

extension CodeFormat {
    /// The C kernels' description of this format's group rows for heads of dimension `d`.
    func kernelLayout(dimension d: Int) -> kvr_code_layout { kernelLayout(layout(dimension: d)) }

    /// The C kernels' description of group rows laid out as `l` (this format's layout).
    func kernelLayout(_ l: Layout) -> kvr_code_layout {
        kvr_code_layout(key_min: l.keyMin, key_step: l.keyStep, key_codes: l.keyCodes, value_min: l.valueMin,
                        value_step: l.valueStep, value_mean: l.valueMean, value_codes: l.valueCodes, row_bytes: l.rowBytes,
                        key_code_bytes: l.keyCodeBytes, value_code_bytes: l.valueCodeBytes, padded: l.padded,
                        group: l.group, key_bits: keyBits, value_bits: valueBits, wide_steps: wideSteps ? 1 : 0,
                        key_blocks: l.keyBlocks ? 1 : 0, value_blocks: l.valueBlocks ? 1 : 0)
    }
}

extension CodeView {
    /// The C kernels' description of this view's group rows.
    var kernelLayout: kvr_code_layout { format.kernelLayout(layout) }
}

extension Attention {
    /// The `quantized` method for one GQA group (`g x d` queries): one scan of the head's key codes
    /// scores every coded position for every query head; each head's best `candidates` (their
    /// union) are scored again exactly and attended with their stored values together with sinks,
    /// window and the positions not yet coded; every other coded position contributes through its
    /// codes, score and value (or nothing, with `tail` off); the two parts merge by log-sum-exp.
    /// Scan and tail are split over `parameters.threads` cores.
    public static func attendQuantized(queries: UnsafeBufferPointer<Float>, codes: CodeView, keys: VectorView,
                                       values: VectorView, parameters: AttentionParameters) throws -> AttentionResult {
        let d = keys.dimension, n = keys.count
        guard queries.count % d == 0, queries.count > 0 else { throw IndexError.dimensionMismatch(expected: d, actual: queries.count) }
        guard values.count == n, n > 0 else { throw IndexError.corrupt("head has \(n) keys but \(values.count) values") }
        let g = queries.count / d
        guard g <= 64 else { throw IndexError.invalidParameter("the quantized method serves at most 64 query heads per KV head (got \(g))") }
        guard codes.info.id == keys.info.id, codes.info.dimension == d, codes.positions <= n else {
            throw IndexError.corrupt("the codes of head \(codes.info.id) cover \(codes.positions) positions of \(n); rebuild them")
        }
        let q = parameters.quantized
        let score = ScoreTransform(parameters, dimension: d)
        let coded = codes.positions
        // Sinks, window and the positions not yet coded are attended exactly whatever the scan says.
        var fixed = staticPositions(count: n, sinks: parameters.sinks, window: parameters.window)
        if coded < n { fixed = Array(Set(fixed).union(coded..<n)).sorted() }
        guard coded > 0, fixed.count < n else {
            return try attend(queries: queries, selector: nil, keys: keys, values: values, parameters: parameters)
        }
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: g * coded)
        defer { scores.deallocate() }
        // The groups split in parts, one per core (flash-decoding's split-K): each part scans its
        // groups, picks its own best candidates and (with a tail) turns its scores into weights
        // and group masses while they are in its cache; the union of the parts' picks is cut to
        // each head's best, whose weights then leave the tail; each part's share of the tail is
        // attended from the codes, merged by log-sum-exp.
        let parts = max(1, min(parameters.threads, codes.count / 32))
        let groupsOf = (0..<parts).map { p in (codes.count * p / parts)..<(codes.count * (p + 1) / parts) }
        let group = codes.format.group
        // Per part and head, its picks as (score, position) pair keys.
        var picks = [[[UInt64]]](repeating: [], count: parts)
        var masses = [TailMasses](repeating: TailMasses(), count: parts)
        // Per part, its picked positions with every head's tail weight there.
        var picked = [PickedWeights](repeating: PickedWeights(), count: parts)
        // With a tail, the static part is attended exactly in the same join, as its last task: the
        // core that finishes its scan first takes it (the tail's plan needs its log-sum-exp).
        var fixedPart: [PartialAttention] = []
        picks.withUnsafeMutableBufferPointer { out in
            picked.withUnsafeMutableBufferPointer { pickedOut in
                masses.withUnsafeMutableBufferPointer { tailOut in
                    let tasks = parts + (q.tail ? 1 : 0)
                    SpinJoin.run(tasks: tasks, threads: max(1, min(parameters.threads, tasks))) { p in
                        guard p < parts else {
                            fixedPart = fixed.withUnsafeBufferPointer {
                                AttentionKernel.attendGroup(queries: queries.baseAddress!, g: g, positions: $0, keys: keys, values: values,
                                                            score: score)
                            }
                            return
                        }
                        let range = groupsOf[p], first = range.lowerBound * group, count = range.count * group
                        scan(queries.baseAddress!, g: g, codes: codes, groups: range, score: score, into: scores)
                        for h in 0..<g {
                            let row = scores + h * coded
                            score.cap(row + first, count: count)
                            for i in fixed where i >= first && i < first + count { row[i] = -.infinity }
                        }
                        if q.candidates > 0 { out[p] = partPicks(scores: scores, g: g, stride: coded, first: first, count: count, take: q.candidates) }
                        if q.tail {
                            tailOut[p] = tailMasses(scores: scores, g: g, coded: coded, group: group, groups: range)
                            if q.candidates > 0 { pickedOut[p] = pickedWeights(out[p], scores: scores, g: g, stride: coded, first: first, count: count) }
                        }
                    }
                }
            }
        }
        // Each head's best candidates over all parts, their union attended exactly with the static part.
        var chosenBits: [UInt64] = []
        let retrieved = q.candidates > 0 ? unionOfBest(picks, g: g, take: q.candidates, below: coded, bits: &chosenBits) : []
        let attended = sortedPositions(fixed, retrieved, below: n)
        var heads: [PartialAttention]
        if q.tail {
            // The retrieved positions are attended beside the tail's value pass, in one join: the
            // first latency-bound (rows at random), the second streaming. Whether a head is sharp
            // is decided before, from the static part attended exactly (in the scan's join) and
            // the retrieved positions' code scores (the weights they leave the tail with).
            // Their weights leave the masses here, from the records the parts took; the scores
            // themselves are zeroed by the value pass's slices (the parts' cores' data, read at
            // random from one core they cost 11-15 us cold).
            let removed = removeFromMasses(picked, chosen: chosenBits, g: g, group: group, parts: groupsOf, masses: &masses)
            let exactLSE = (0..<g).map { h in
                logSumExp([fixedPart[h].lse] + removed.indices.map { p in masses[p].maxima[h] + log(removed[p][h]) })
            }
            // One decision over the whole head (sharp or not, which groups weigh), then each
            // part's values: the same result whatever the number of parts.
            let plan = TailPlan(masses, exactLSE: exactLSE, groups: codes.count, parameters: q)
            // The value pass's work is uneven (the groups that weigh cluster), so each part's
            // groups split in slices that both cores claim as they finish.
            let slices = tailSlices(groupsOf)
            let chosen = setBits(chosenBits)
            let first = chosen.isEmpty ? 0 : 1
            var tails = [[PartialAttention]](repeating: [], count: first + slices.count)
            tails.withUnsafeMutableBufferPointer { out in
                SpinJoin.run(tasks: out.count, threads: parts) { t in
                    guard t >= first else {
                        out[t] = chosen.withUnsafeBufferPointer {
                            AttentionKernel.attendGroup(queries: queries.baseAddress!, g: g, positions: $0, keys: keys, values: values, score: score)
                        }
                        return
                    }
                    let slice = slices[t - first]
                    zero(chosen, in: (slice.groups.lowerBound * group)..<(slice.groups.upperBound * group), scores: scores, g: g, stride: coded)
                    out[t] = tailPartials(scores: scores, g: g, codes: codes, part: groupsOf[slice.part], groups: slice.groups,
                                          dimension: values.dimension, masses: masses[slice.part], plan: plan)
                }
            }
            heads = (0..<g).map { h in PartialAttention.merged(count: 1 + tails.count) { $0 == 0 ? fixedPart[h] : tails[$0 - 1][h] } }
        } else {
            heads = attended.withUnsafeBufferPointer {
                AttentionKernel.attendGroup(queries: queries.baseAddress!, g: g, positions: $0, keys: keys, values: values,
                                            score: score, parts: parameters.threads)
            }
        }
        let stats = SearchStats(distanceComputations: attended.count * g, auxiliaryComputations: coded * g, queries: g, keyCount: n)
        return AttentionResult(heads: heads, retrieved: retrieved, attended: attended, stats: stats)
    }

    /// Scaled approximate scores of the positions of `groups` (into `scores`, `g x codes.positions`).
    static func scan(_ queries: UnsafePointer<Float>, g: Int, codes: CodeView, groups: Range<Int>, score: ScoreTransform,
                     into scores: UnsafeMutablePointer<Float>) {
        var layout = codes.kernelLayout
        let d = codes.info.dimension, coded = codes.positions
        let rows = UnsafeMutablePointer<UnsafeRawPointer?>.allocate(capacity: max(1, groups.count))
        let q8 = UnsafeMutablePointer<Int8>.allocate(capacity: (g + 3) / 4 * 4 * layout.padded)
        let dots = UnsafeMutablePointer<Int32>.allocate(capacity: g * layout.group)
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: 3 * layout.padded)
        defer { rows.deallocate(); q8.deallocate(); dots.deallocate(); scratch.deallocate() }
        for (j, gi) in groups.enumerated() { rows[j] = codes.row(gi) }
        kvr_code_scores(queries, g, d, rows, groups.count, &layout, score.scale, scores + groups.lowerBound * layout.group, coded,
                        q8, dots, scratch)
    }

    /// One part's tail weights: per head the part's maximum score, its weights' total and each
    /// group's share (`g x groups.count`), the weights exp(s - max) left in `scores`.
    struct TailMasses {
        var maxima: [Float] = [], totals: [Float] = [], groupMass: [Float] = []

        /// Runs `body` with `remove(weight, head, group)`, which takes a head's weight at one of the
        /// part's `count` groups out of that group's and the part's mass (a subtraction that cancels
        /// stops at 0).
        mutating func removing(groups count: Int, _ body: (_ remove: (Float, Int, Int) -> Void) -> Void) {
            groupMass.withUnsafeMutableBufferPointer { mass in
                totals.withUnsafeMutableBufferPointer { totals in
                    body { w, h, j in
                        mass[h * count + j] = max(0, mass[h * count + j] - w)
                        totals[h] = max(0, totals[h] - w)
                    }
                }
            }
        }
    }

    static func tailMasses(scores: UnsafeMutablePointer<Float>, g: Int, coded: Int, group: Int, groups: Range<Int>) -> TailMasses {
        let count = groups.count, first = groups.lowerBound * group
        var m = TailMasses(maxima: Array(repeating: -.infinity, count: g), totals: Array(repeating: 0, count: g),
                           groupMass: Array(repeating: 0, count: g * count))
        m.groupMass.withUnsafeMutableBufferPointer { mass in
            for h in 0..<g {
                let row = scores + h * coded + first
                let top = kvr_max(row, count * group)
                m.maxima[h] = top
                guard top > -.infinity else { row.update(repeating: 0, count: count * group); continue }
                m.totals[h] = kvr_exp_sub_groups(row, count, group, top, mass.baseAddress! + h * count)
            }
        }
        return m
    }

    /// Takes attended positions out of the parts' tails: their weights become 0 and leave their
    /// groups' and parts' masses (the parts' maxima stay as reference points: the weights are
    /// relative to them, whatever they include). A subtraction that cancels leaves at most a
    /// float's rounding of the removed weight, far below what decides or shifts anything.
    /// Returns, per part and head, the weight taken out (relative to the part's maximum).
    @discardableResult
    static func removeFromTail(_ positions: [Int], scores: UnsafeMutablePointer<Float>, g: Int, coded: Int, group: Int,
                               parts: [Range<Int>], masses: inout [TailMasses]) -> [[Float]] {
        var removed = [[Float]](repeating: Array(repeating: 0, count: g), count: parts.count)
        guard !positions.isEmpty else { return removed }
        for p in parts.indices {
            let range = parts[p]
            var taken = removed[p]
            masses[p].removing(groups: range.count) { remove in
                for i in positions where range.contains(i / group) {
                    for h in 0..<g {
                        let w = scores[h * coded + i]
                        scores[h * coded + i] = 0
                        guard w > 0 else { continue }
                        taken[h] += w
                        remove(w, h, i / group - range.lowerBound)
                    }
                }
            }
            removed[p] = taken
        }
        return removed
    }

    /// One part's picked positions (ascending, each once over the part's heads) and every head's
    /// weight there (`g` per position, from the part's weights in `scores`): what the tail loses
    /// when they are attended exactly, read by the part's own core.
    struct PickedWeights {
        var positions: [Int32] = [], weights: [Float] = []
    }

    static func pickedWeights(_ picks: [[UInt64]], scores: UnsafeMutablePointer<Float>, g: Int, stride: Int, first: Int,
                              count: Int) -> PickedWeights {
        var bits = [UInt64](repeating: 0, count: (count + 63) / 64)  // a bit per position of the part
        for head in picks { for key in head { let i = Int(kvr_pair_id(key)) - first; bits[i >> 6] |= 1 << UInt64(i & 63) } }
        var out = PickedWeights()
        out.positions = setBits(bits).map { Int32(first + $0) }
        out.weights = [Float](unsafeUninitializedCapacity: out.positions.count * g) { buffer, written in
            for (k, i) in out.positions.enumerated() { for h in 0..<g { buffer[k * g + h] = scores[h * stride + Int(i)] } }
            written = out.positions.count * g
        }
        return out
    }

    /// `removeFromTail`'s accounting from the parts' records: the weights of the positions set in
    /// `chosen` (a bit per position) leave their groups' and parts' masses; the scores are left
    /// as they are (`zero` clears them). Returns, per part and head, the weight taken out.
    static func removeFromMasses(_ picked: [PickedWeights], chosen: [UInt64], g: Int, group: Int, parts: [Range<Int>],
                                 masses: inout [TailMasses]) -> [[Float]] {
        var removed = [[Float]](repeating: Array(repeating: 0, count: g), count: parts.count)
        for p in parts.indices where !picked[p].positions.isEmpty {
            let range = parts[p]
            var taken = removed[p]
            masses[p].removing(groups: range.count) { remove in
                chosen.withUnsafeBufferPointer { bits in
                    picked[p].positions.withUnsafeBufferPointer { positions in
                        picked[p].weights.withUnsafeBufferPointer { weights in
                            for k in positions.indices {
                                let i = Int(positions[k])
                                guard bits[i >> 6] & (1 << UInt64(i & 63)) != 0 else { continue }
                                for h in 0..<g {
                                    let w = weights[k * g + h]
                                    guard w > 0 else { continue }
                                    taken[h] += w
                                    remove(w, h, i / group - range.lowerBound)
                                }
                            }
                        }
                    }
                }
            }
            removed[p] = taken
        }
        return removed
    }

    /// Zeroes every head's score (`g` rows of `stride`) at the positions of `sorted` inside `range`.
    static func zero(_ sorted: [Int], in range: Range<Int>, scores: UnsafeMutablePointer<Float>, g: Int, stride: Int) {
        var lo = 0, hi = sorted.count
        while lo < hi { let mid = (lo + hi) / 2; if sorted[mid] < range.lowerBound { lo = mid + 1 } else { hi = mid } }
        while lo < sorted.count && sorted[lo] < range.upperBound {
            for h in 0..<g { scores[h * stride + sorted[lo]] = 0 }
            lo += 1
        }
    }

    /// The decisions over a head's whole tail: which heads keep it (not sharp) and, per head, the
    /// mass (relative to its whole tail's maximum) from which a group goes through its value codes.
    struct TailPlan {
        var maximum: [Float], keeps: [Bool], detailFloor: [Float]

        init(_ parts: [TailMasses], exact: [PartialAttention], groups: Int, parameters q: QuantizedParameters) {
            self.init(parts, exactLSE: exact.map(\.lse), groups: groups, parameters: q)
        }

        /// `exactLSE`: per head, the log-sum-exp of the scores the exact part holds (or an estimate).
        init(_ parts: [TailMasses], exactLSE: [Float], groups: Int, parameters q: QuantizedParameters) {
            let g = exactLSE.count
            maximum = (0..<g).map { h in parts.map { $0.maxima[h] }.max() ?? -.infinity }
            keeps = Array(repeating: false, count: g)
            detailFloor = Array(repeating: .infinity, count: g)
            for h in 0..<g where maximum[h] > -.infinity {
                let total = parts.reduce(Float(0)) { $0 + ($1.totals[h] > 0 ? $1.totals[h] * exp($1.maxima[h] - maximum[h]) : 0) }
                // A head whose tail holds less than `tailFloor` of its exact part's mass is sharp.
                keeps[h] = total > 0 && maximum[h] + log(total) - exactLSE[h] >= log(q.tailFloor)
                detailFloor[h] = q.tailDetail * total / Float(groups)
            }
        }
    }

    /// Slices of a part's groups in the value pass (claimed by whichever core is free).
    static let tailSlicesPerPart = 4

    /// The value pass's slices: each part's groups in up to `tailSlicesPerPart` runs of at least 8.
    static func tailSlices(_ parts: [Range<Int>]) -> [(part: Int, groups: Range<Int>)] {
        parts.enumerated().flatMap { p, range in
            let k = max(1, min(tailSlicesPerPart, range.count / 8))
            return (0..<k).map { (part: p, groups: (range.lowerBound + range.count * $0 / k)..<(range.lowerBound + range.count * ($0 + 1) / k)) }
        }
    }

    /// One part's picks: per head its best `take` of `scores[h * stride + first ..< + count]` as
    /// (score, index) pair keys, in no particular order (ties to the lower position; -inf never
    /// taken): a selection over 64-bit pair keys, O(count).
    static func partPicks(scores: UnsafeMutablePointer<Float>, g: Int, stride: Int, first: Int, count: Int, take: Int) -> [[UInt64]] {
        guard take > 0, count > 0 else { return Array(repeating: [], count: g) }
        let keys = UnsafeMutablePointer<UInt64>.allocate(capacity: max(1, count))  // one buffer for every head
        defer { keys.deallocate() }
        var best = [Int32](repeating: 0, count: take)
        return (0..<g).map { h in
            let row = scores + h * stride
            let k = best.withUnsafeMutableBufferPointer { kvr_best_positions(row + first, count, take, $0.baseAddress!, keys) }
            return best[0..<k].map { kvr_pair_key(row[first + Int($0)], Int32(first) + $0) }
        }
    }

    /// Each head's best `take` over the parts' picks (`picks[part][head]`), their union in the order
    /// found (indices below `below`).
    static func unionOfBest(_ picks: [[[UInt64]]], g: Int, take: Int, below: Int) -> [Int] {
        var bits: [UInt64] = []
        return unionOfBest(picks, g: g, take: take, below: below, bits: &bits)
    }

    /// `unionOfBest`, with the union as a bit per index below `below` in `chosen`.
    static func unionOfBest(_ picks: [[[UInt64]]], g: Int, take: Int, below: Int, bits chosen: inout [UInt64]) -> [Int] {
        var union: [Int] = []
        union.reserveCapacity(g * take)
        chosen = [UInt64](repeating: 0, count: (below + 63) / 64)
        let pool = UnsafeMutablePointer<UInt64>.allocate(capacity: max(1, picks.count * take))  // a part picks at most `take` per head
        defer { pool.deallocate() }
        chosen.withUnsafeMutableBufferPointer { bits in
            for h in 0..<g {
                var m = 0
                for part in picks where h < part.count {
                    part[h].withUnsafeBufferPointer { keys in
                        guard let base = keys.baseAddress else { return }
                        (pool + m).initialize(from: base, count: keys.count)
                        m += keys.count
                    }
                }
                let k = min(m, take)
                if k < m { _ = kvr_select_u64(pool, m, k) }
                for j in 0..<k {
                    let i = Int(kvr_pair_id(pool[j]))
                    if bits[i >> 6] & (1 << UInt64(i & 63)) == 0 { bits[i >> 6] |= 1 << UInt64(i & 63); union.append(i) }
                }
            }
        }
        return union
    }

    /// Each head's attention over `groups` (a slice of `part`, whose masses `m` come from
    /// `tailMasses`), from the codes: values from each position's value codes in the groups that
    /// weigh (per `plan`), from the group's mean value in the others.
    static func tailPartials(scores: UnsafeMutablePointer<Float>, g: Int, codes: CodeView, part: Range<Int>, groups: Range<Int>,
                             dimension dv: Int, masses m: TailMasses, plan: TailPlan) -> [PartialAttention] {
        tailPartials(scores: scores, g: g, stride: codes.positions, layout: codes.kernelLayout, row: { codes.row($0) }, part: part,
                     groups: groups, dimension: dv, masses: m, plan: plan)
    }

    /// How many groups ahead the value pass fetches a light group's mean value: cold, a tail read
    /// mostly through means (tail detail 8) took 100-110 us unfetched, 72-80 us fetched 4 ahead.
    static let meansAhead = 4

    /// `tailPartials` over any code rows: group `j`'s row is `row(j)`, its scores at `j * group` of
    /// each head's `stride`.
    static func tailPartials(scores: UnsafeMutablePointer<Float>, g: Int, stride coded: Int, layout: kvr_code_layout,
                             row codeRow: (Int) -> UnsafeRawPointer, part: Range<Int>, groups: Range<Int>,
                             dimension dv: Int, masses m: TailMasses, plan: TailPlan) -> [PartialAttention] {
        var layout = layout
        let group = layout.group, padded = layout.padded
        let count = part.count, offset = groups.lowerBound - part.lowerBound
        let first = groups.lowerBound * group
        // Per head, the slice's share of the part's tail weights (their sum: the groups' masses).
        let totals = (0..<g).map { h in
            plan.keeps[h] && m.totals[h] > 0 ? (0..<groups.count).reduce(Float(0)) { $0 + m.groupMass[h * count + offset + $1] } : 0
        }
        let keeps = totals.map { $0 > 0 }
        guard keeps.contains(true) else { return Array(repeating: .empty(dimension: dv), count: g) }
        for h in 0..<g where !keeps[h] { (scores + h * coded + first).update(repeating: 0, count: groups.count * group) }
        // A group's mass relative to the head's maximum over the whole tail.
        let rescale = (0..<g).map { h in keeps[h] ? exp(m.maxima[h] - plan.maximum[h]) : 0 }
        var sum = [Float](repeating: 0, count: g * padded), scratch = [Float](repeating: 0, count: 2 * padded)
        var masses = [Float](repeating: 0, count: g)
        var row: UnsafeRawPointer? = nil
        sum.withUnsafeMutableBufferPointer { s in
            scratch.withUnsafeMutableBufferPointer { t in
                let detailed = (0..<groups.count).map { j in
                    (0..<g).contains { h in keeps[h] && m.groupMass[h * count + offset + j] * rescale[h] >= plan.detailFloor[h] }
                }
                // The next detailed group's codes are fetched while this one is read (the first one's before),
                // and the mean value of the light group `meansAhead` further on: each sits in its own row,
                // a page or more from the last, and waited out a page walk and a miss when read unfetched.
                var ahead = detailed.firstIndex(of: true) ?? groups.count
                if ahead < groups.count { kvr_prefetch_values(codeRow(groups.lowerBound + ahead), &layout) }
                let meanBytes = layout.value_codes - layout.value_mean
                for j in 0..<min(Self.meansAhead, groups.count) where !detailed[j] {
                    kvr_prefetch(codeRow(groups.lowerBound + j) + layout.value_mean, meanBytes)
                }
                for j in 0..<groups.count {
                    row = codeRow(groups.lowerBound + j)
                    let mass = offset + j
                    if j + Self.meansAhead < groups.count, !detailed[j + Self.meansAhead] {
                        kvr_prefetch(codeRow(groups.lowerBound + j + Self.meansAhead) + layout.value_mean, meanBytes)
                    }
                    if detailed[j] {
                        ahead = j + 1
                        while ahead < groups.count && !detailed[ahead] { ahead += 1 }
                        let after = ahead < groups.count ? codeRow(groups.lowerBound + ahead) : nil
                        kvr_code_values(scores + first + j * group, g, coded, &row, 1, &layout, dv, s.baseAddress!, t.baseAddress!, after)
                    } else {
                        for h in 0..<g { masses[h] = keeps[h] ? m.groupMass[h * count + mass] : 0 }
                        kvr_code_means(masses, g, row, &layout, dv, s.baseAddress!, t.baseAddress!)
                    }
                }
            }
        }
        return (0..<g).map { h in
            guard keeps[h] else { return .empty(dimension: dv) }
            let inv = 1 / totals[h]
            return PartialAttention(output: (0..<dv).map { sum[h * padded + $0] * inv }, lse: m.maxima[h] + log(totals[h]))
        }
    }
}

