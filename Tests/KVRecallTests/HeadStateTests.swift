import Foundation
import Testing
@testable import KVRecall
@testable import KVRecallSupport
@testable import KVRecallStorage
@testable import KVRecallIndexes
@testable import KVRecallAttention
@testable import KVRecallPlanning
@testable import KVRecallSession
import KVRecallTestSupport

/// What a session keeps per head between calls: views continued across appends, the estimation
/// zone's summary extended with the keys an index gains, the budget kept in its own record.
@Suite struct HeadStateTests {
    /// A view continued after appends (partial last block completed, new blocks) reads exactly the
    /// rows a fresh view reads, and keeps the earlier full blocks' pointers.
    @Test(arguments: [1, 15, 16, 17, 40])
    func continuedViewsEqualFreshViews(appended: Int) throws {
        let dir = TemporaryDirectory()
        var rng = SeededRandom(seed: 3)
        let d = 8, id = HeadID(layer: 0, head: 0)
        let keys = rng.gaussianMatrix(rows: 100, dim: d), values = rng.gaussianMatrix(rows: 100, dim: d)
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.createHead(id, dimension: d, dtype: .f16, blockSize: 16)
        func append(_ rows: Range<Int>) throws {
            try keys.withUnsafeBufferPointer { kb in
                try values.withUnsafeBufferPointer { vb in
                    let span = (rows.lowerBound * d)..<(rows.upperBound * d)
                    try store.append(id, keys: UnsafeBufferPointer(rebasing: kb[span]), values: UnsafeBufferPointer(rebasing: vb[span]))
                }
            }
        }
        try append(0..<37)
        let first = try store.read { try $0.vectors(id, .keys) }
        try append(37..<(37 + appended))
        try store.read { snapshot in
            let continued = try snapshot.vectors(continuing: first, count: 37 + appended)
            let fresh = try snapshot.vectors(id, .keys)
            #expect(continued.count == fresh.count)
            #expect(continued.decode(rows: 0..<fresh.count) == fresh.decode(rows: 0..<fresh.count))
            #expect(Array(continued.blocks.prefix(2)) == Array(first.blocks.prefix(2)))  // whole blocks kept
            #expect(continued.snapshot == snapshot.txn.mapIdentity)
        }
    }

    /// The estimation zone's cluster summary extended with the keys an IVF index gained equals one
    /// computed afresh over all of them.
    @Test func anExtendedClusterSummaryEqualsAFreshOne() throws {
        let f = try IndexFixture(n: 600, d: 16, clusters: 8, seed: 5)
        try f.store.read { snapshot in
            do {
                let keys = try snapshot.vectors(f.id, .keys), values = try snapshot.vectors(f.id, .values)
                var build = IndexBuildParameters()
                build.nlist = 12
                let ivf = try IVFIndex(dimension: 16, parameters: build)
                try ivf.add(keys: keys, range: 0..<400, progress: nil)
                var summary = try ClusterSummary(ivf: ivf, keys: keys, values: values)
                try ivf.add(keys: keys, range: 400..<600, progress: nil)
                try summary.extend(ivf: ivf, keys: keys, values: values)
                let fresh = try ClusterSummary(ivf: ivf, keys: keys, values: values)
                #expect(summary.sizes == fresh.sizes)
                #expect(summary.clusterOf == fresh.clusterOf)
                #expect(summary.members == fresh.members)
                #expect(zip(summary.meanKeys, fresh.meanKeys).allSatisfy { abs($0 - $1) < 1e-4 })
                #expect(zip(summary.valueSums, fresh.valueSums).allSatisfy { abs($0 - $1) < 1e-3 })
            }
        }
    }

    /// An index method's adaptive budget is stored as the `budget` record, not as `auto`'s plan.
    @Test func theBudgetHasItsOwnRecord() throws {
        let dir = TemporaryDirectory()
        let session = try AdaptiveBudgetTests.session(0.9, directory: dir.path)
        try session.checkpoint()
        let records = try session.store.read { snapshot in
            (try HeadPlan.load(snapshot: snapshot, head: HeadID(), record: .budget),
             try HeadPlan.load(snapshot: snapshot, head: HeadID(), record: .auto))
        }
        #expect(records.0?.k != nil)
        #expect(records.1 == nil)
        session.close()
        let resumed = try KVSession(resuming: dir.path)
        defer { resumed.close() }
        #expect(try resumed.plan(layer: 0, head: 0)?.k != nil)
    }
}
