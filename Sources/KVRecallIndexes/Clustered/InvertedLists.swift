import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
/// Inverted lists in CSR form (faiss's `InvertedLists`): list `l` holds the key positions
/// `ids[offsets[l]..<offsets[l + 1]]`, ascending, and their codes at the same positions of
/// `codes` (`codeSize` bytes each), so a probed list is one contiguous run of codes. Shared by
/// IVF (one list per centroid), the centroid tree (one per fine centroid) and the estimation zone.
public struct InvertedLists: Sendable, Equatable {
    /// `lists + 1` offsets into `ids`, from 0 to the number of keys.
    public private(set) var offsets: [Int]
    /// Key positions, list after list (a view of the stored section once loaded).
    public private(set) var ids: SectionArray<Int32>
    /// Bytes of code per key (0: lists without codes).
    public let codeSize: Int
    /// `codeSize` bytes per key, in the order of `ids` (a view of the stored section once loaded).
    public private(set) var codes: SectionArray<UInt8>

    /// `lists` empty lists.
    public init(lists: Int, codeSize: Int = 0) {
        offsets = [Int](repeating: 0, count: lists + 1)
        ids = []
        self.codeSize = codeSize
        codes = []
    }

    /// Lists read from disk, checked: `lists + 1` non-decreasing offsets from 0 to `keyCount`,
    /// ids forming a permutation of 0..<keyCount, and `codeSize` bytes of code per key, so a
    /// damaged section can never send a scan out of bounds.
    init(validating offsets: [Int], ids: SectionArray<Int32>, codes: SectionArray<UInt8>, codeSize: Int, lists: Int, keyCount count: Int,
         what: String) throws {
        guard offsets.count == lists + 1, offsets.first == 0, offsets.last == count, ids.count == count else {
            throw IndexError.corrupt("\(what) list offsets do not cover its \(count) keys in \(lists) lists")
        }
        guard codes.count == count * codeSize else {
            throw IndexError.corrupt("\(what) lists hold \(codes.count) bytes of codes, expected \(count) x \(codeSize)")
        }
        for l in 0..<lists where offsets[l] > offsets[l + 1] {
            throw IndexError.corrupt("\(what) list \(l) has negative length")
        }
        var seen = [Bool](repeating: false, count: count)
        try ids.withUnsafeBufferPointer { ids in
            for id in ids {
                guard id >= 0, Int(id) < count, !seen[Int(id)] else {
                    throw IndexError.corrupt("\(what) lists name key \(id) out of range or twice")
                }
                seen[Int(id)] = true
            }
        }
        self.offsets = offsets
        self.ids = ids
        self.codeSize = codeSize
        self.codes = codes
    }

    /// Number of lists.
    public var count: Int { offsets.count - 1 }

    /// Keys in all lists.
    public var keyCount: Int { ids.count }

    /// Keys in each list.
    public var sizes: [Int] { (0..<count).map { offsets[$0 + 1] - offsets[$0] } }

    /// Positions of the keys in list `l`, ascending.
    public func list(_ l: Int) -> Slice<SectionArray<Int32>> { ids[offsets[l]..<offsets[l + 1]] }

    /// Largest list.
    public var maxListSize: Int { (0..<count).reduce(0) { max($0, offsets[$1 + 1] - offsets[$1]) } }

    /// Appends keys `firstID...` with `labels[j]` naming the list of key `firstID + j` and
    /// `newCodes[j * codeSize...]` its code, rebuilding the CSR arrays in one pass; ids stay
    /// ascending per list when `firstID` exceeds every stored id.
    public mutating func append(labels: [Int32], firstID: Int, codes newCodes: [UInt8] = []) {
        precondition(newCodes.count == labels.count * codeSize, "one code per appended key")
        let lists = count, cs = codeSize
        var newOffsets = [Int](repeating: 0, count: lists + 1)
        for l in 0..<lists { newOffsets[l + 1] = offsets[l + 1] - offsets[l] }
        for l in labels { newOffsets[Int(l) + 1] += 1 }
        for l in 0..<lists { newOffsets[l + 1] += newOffsets[l] }
        var newIDs = [Int32](repeating: 0, count: newOffsets[lists])
        var allCodes = [UInt8](repeating: 0, count: newOffsets[lists] * cs)
        var cursor = [Int](repeating: 0, count: lists)
        newIDs.withUnsafeMutableBufferPointer { out in
            allCodes.withUnsafeMutableBufferPointer { outCodes in
                ids.withUnsafeBufferPointer { old in
                    codes.withUnsafeBufferPointer { oldCodes in
                        for l in 0..<lists {
                            let at = newOffsets[l], lo = offsets[l], n = offsets[l + 1] - lo
                            for p in 0..<n { out[at + p] = old[lo + p] }
                            if cs > 0 && n > 0 {
                                (outCodes.baseAddress! + at * cs).update(from: oldCodes.baseAddress! + lo * cs, count: n * cs)
                            }
                            cursor[l] = at + n
                        }
                    }
                }
                newCodes.withUnsafeBufferPointer { fresh in
                    for (j, l) in labels.enumerated() {
                        let at = cursor[Int(l)]
                        out[at] = Int32(firstID + j)
                        if cs > 0 { (outCodes.baseAddress! + at * cs).update(from: fresh.baseAddress! + j * cs, count: cs) }
                        cursor[Int(l)] += 1
                    }
                }
            }
        }
        offsets = newOffsets
        ids = SectionArray(newIDs)
        codes = SectionArray(allCodes)
    }

    /// Writes offsets, ids, then codes (aligned, read back as views).
    func write(to writer: inout ByteWriter) {
        writer.write(array: offsets.map(Int64.init))
        writer.write(alignedArray: ids)
        writer.write(alignedArray: codes)
    }

    /// Reads what `write` wrote and validates it (see `init(validating:)`).
    static func read(from reader: inout ByteReader, lists: Int, keyCount: Int, codeSize: Int, what: String) throws -> InvertedLists {
        let offsets = try reader.readArray(Int64.self).map { Int(truncatingIfNeeded: $0) }
        let ids = try reader.readAlignedArray(Int32.self)
        // Codes are read as wider words (f16 as UInt16, SIMD loads): a view only when 8-aligned.
        let codes = try reader.readAlignedArray(UInt8.self, alignment: 8)
        return try InvertedLists(validating: offsets, ids: ids, codes: codes, codeSize: codeSize, lists: lists,
                                 keyCount: keyCount, what: what)
    }
}
