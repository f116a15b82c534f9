import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

extension RetrievalGraphIndex: GroupSearchable {
    /// Top-`k` for each query of a GQA group (`g x dimension`) by one shared walk of the graph
    /// (`groupBeamSearch`): each reached key is read once for the whole group. An ef below `k`
    /// narrows each query's beam as in `search`.
    public func searchGroup(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                            keys: VectorView) throws -> SearchResults {
        let g = try validateSearch(queries, k: k, dimension: dimension, keys: keys, indexSnapshot: mapSnapshot)
        guard count > 0 else { throw IndexError.notBuilt("the retrieval graph is empty") }
        guard keys.count >= count else { throw IndexError.corrupt("the graph covers \(count) keys but the head holds \(keys.count)") }
        try parameters.graph.validate()
        var results = SearchResults(k: k, queryCount: g)
        results.stats.keyCount = count
        guard g > 0 else { return results }
        let scratches = (0..<g).map { _ in scratchPool.take(dimension: dimension, capacity: count) }
        defer { scratches.forEach(scratchPool.give) }
        scratches[0].computations = 0
        groupBeamSearch(graph, queries: queries.baseAddress!, g: g, keys: keys, entries: entries,
                        ef: parameters.graph.ef, keep: k, scratches: scratches, limit: count)
        results.ids.withUnsafeMutableBufferPointer { ids in
            results.scores.withUnsafeMutableBufferPointer { scores in
                for h in 0..<g { drainResults(scratches[h], k: k, row: h, ids: ids, scores: scores) }
            }
        }
        results.stats.distanceComputations = scratches[0].computations
        return results
    }
}
