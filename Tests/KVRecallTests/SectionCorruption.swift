import Testing
@testable import KVRecall
@testable import KVRecallSupport
@testable import KVRecallKernels
@testable import KVRecallFormats
@testable import KVRecallStorage
@testable import KVRecallIndexes
@testable import KVRecallAttention
@testable import KVRecallSession

/// Checks that `load` refuses, with `IndexError.corrupt`, every damaged variant of `good`: each
/// section missing, cut at each of `cuts` (and at half and one short), and with a trailing byte.
func expectCorruptVariantsRefused(_ good: [String: [UInt8]], cuts: [Int], trailing: UInt8,
                                  load: ([String: [UInt8]]) throws -> Void) {
    func expectCorrupt(_ sections: [String: [UInt8]], _ label: String) {
        expectRefusedAsCorrupt(sections, label, load: load)
    }
    for name in good.keys.sorted() {
        var missing = good
        missing[name] = nil
        expectCorrupt(missing, "missing \(name)")
        for cut in cuts + [good[name]!.count / 2, good[name]!.count - 1] {
            var s = good
            s[name] = Array(good[name]![0..<cut])
            expectCorrupt(s, "\(name) cut at \(cut)")
        }
        var longer = good
        longer[name]! += [trailing]
        expectCorrupt(longer, "\(name) with a trailing byte")
    }
}

/// Checks that `load` refuses `sections` with `IndexError.corrupt`.
func expectRefusedAsCorrupt(_ sections: [String: [UInt8]], _ label: String, load: ([String: [UInt8]]) throws -> Void) {
    do {
        try load(sections)
        Issue.record("\(label): loaded")
    } catch let error as IndexError {
        if case .corrupt = error {} else { Issue.record("\(label): \(error)") }
    } catch { Issue.record("\(label): \(error)") }
}
