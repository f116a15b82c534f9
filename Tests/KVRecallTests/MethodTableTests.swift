import Foundation
import Testing
@testable import KVRecallIndexes
@testable import KVRecallAttention
@testable import KVRecallSession
import KVRecallTestSupport

/// `AttentionMethod.table` is the one list of methods: the C header and Python's list must agree with it.
@Suite struct MethodTableTests {
    /// `enum kvrecall_method` in include/kvrecall.h, as (NAME, value) pairs in the order written.
    func headerMethods() throws -> [(name: String, value: Int32)] {
        let header = URL(fileURLWithPath: repositoryDataDirectory()).deletingLastPathComponent()
            .appendingPathComponent("include/kvrecall.h")
        let text = try String(contentsOf: header, encoding: .utf8)
        let body = try #require(text.range(of: "enum kvrecall_method {").map { text[$0.upperBound...] })
        let enumBody = body[..<body.firstIndex(of: "}")!]
        let pattern = try NSRegularExpression(pattern: "KVRECALL_METHOD_([A-Z_]+)\\s*=\\s*(\\d+)")
        let ns = String(enumBody)
        return pattern.matches(in: ns, range: NSRange(ns.startIndex..., in: ns)).map { m in
            (String(ns[Range(m.range(at: 1), in: ns)!]), Int32(ns[Range(m.range(at: 2), in: ns)!])!)
        }
    }

    @Test func headerEnumMatchesTheTable() throws {
        let header = try headerMethods()
        #expect(header.count == AttentionMethod.table.count)
        for entry in AttentionMethod.table {
            let row = header.first { $0.name == entry.method.rawValue.uppercased() }
            #expect(row?.value == entry.cValue, "KVRECALL_METHOD_\(entry.method.rawValue.uppercased()) in include/kvrecall.h")
        }
    }

    @Test func everyMethodHasOneRowAndContiguousCValues() {
        #expect(Set(AttentionMethod.table.map(\.method)) == Set(AttentionMethod.allCases))
        #expect(AttentionMethod.table.map(\.cValue) == Array(0..<Int32(AttentionMethod.table.count)))
        for entry in AttentionMethod.table {
            #expect(AttentionMethod(cValue: entry.cValue) == entry.method)
        }
        #expect(AttentionMethod(cValue: -1) == nil)
        #expect(AttentionMethod(cValue: Int32(AttentionMethod.table.count)) == nil)
    }

    @Test func pythonListMatchesTheTable() throws {
        let file = URL(fileURLWithPath: repositoryDataDirectory()).deletingLastPathComponent()
            .appendingPathComponent("Python/kvrecall/__init__.py")
        let text = try String(contentsOf: file, encoding: .utf8)
        let line = try #require(text.split(separator: "\n").first { $0.hasPrefix("METHODS = (") })
        let names = line.split(separator: "\"").enumerated().filter { $0.offset % 2 == 1 }.map { String($0.element) }
        #expect(names == AttentionMethod.table.map(\.method.rawValue))
    }

    /// A checkpoint stores the method by name: typed, it round-trips, and an unknown name is refused.
    @Test func configurationStoresTheMethodByName() throws {
        let configuration = SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 1, headDimension: 4, method: .hnsw)
        let json = String(decoding: try JSONEncoder().encode(configuration), as: UTF8.self)
        #expect(json.contains("\"method\":\"hnsw\""))
        #expect(try JSONDecoder().decode(SessionConfiguration.self, from: Data(json.utf8)) == configuration)
        let unknown = json.replacingOccurrences(of: "\"hnsw\"", with: "\"warp\"")
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(SessionConfiguration.self, from: Data(unknown.utf8)) }
    }
}
