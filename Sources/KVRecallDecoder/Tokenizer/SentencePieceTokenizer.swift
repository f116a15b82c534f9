// SentencePiece-style tokenizer for GGUF vocabularies whose `tokenizer.ggml.model` is "llama" (Gemma 3).
//
// Encoding is SentencePiece's BPE encoder as llama.cpp's SPM tokenizer (`llm_tokenizer_spm`) implements it:
//  1. " " is replaced by "▁" (U+2581) in the whole text.
//  2. User-defined pieces (GGUF token type 4: "\n", "\n\n", runs of spaces and tabs, "<b>", "<table>", ...) are cut
//     out first, leftmost-longest, and emitted as their own ids. The GGUF converter stores Gemma's "▁▁" pieces as
//     "  ", so they are matched with spaces escaped too. This is SentencePiece's prefix matcher. llama.cpp instead
//     matches user-defined pieces longest-first on the raw text before escaping; the two agree on every text
//     without a literal "▁" (one user-defined piece's suffix is never another's prefix in Gemma 3's vocabulary),
//     and where they differ (literal "▁" next to a space) we follow SentencePiece, the tokenizer Gemma was
//     trained with.
//     Control pieces ("<bos>", "<start_of_turn>", ...) are NOT matched: input is plain text, so "<start_of_turn>"
//     typed in a prompt tokenizes as ordinary characters. Callers that build chat prompts insert control ids
//     themselves (see `tokenID(forPiece:)`).
//  3. Each fragment between them is split into UTF-8 characters, and adjacent symbols are merged greedily: always
//     the pair whose concatenation is a vocabulary piece with the highest score, ties to the leftmost pair,
//     through a bigram priority queue (O(n log n)). Only normal, user-defined and unused pieces take part
//     (SentencePiece's rule; llama.cpp would also accept a control or byte piece's text).
//  4. A final symbol that is not a piece is emitted as byte pieces "<0xNN>", one per UTF-8 byte (byte fallback),
//     or as the unknown id when the vocabulary has no byte piece for that byte.
//
// Cross-checked against the `sentencepiece` library (a BPE ModelProto built from the GGUF vocabulary): identical
// ids on ~255K characters of English, code, multilingual text, emoji, tabs, CRLF, runs of spaces and newlines,
// random slices and random strings over an adversarial alphabet.

/// A tokenizer problem: an inconsistent or missing vocabulary.
public struct TokenizerError: Error, CustomStringConvertible {
    public let message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { "tokenizer: \(message)" }
}

/// Gemma 3's tokenizer, built from the vocabulary stored in a GGUF file. Immutable and thread-safe.
public final class SentencePieceTokenizer: Sendable {
    /// GGUF token types (`tokenizer.ggml.token_type`, llama.cpp's `llama_token_type`).
    public enum TokenType {
        public static let normal: Int32 = 1
        public static let unknown: Int32 = 2
        public static let control: Int32 = 3
        public static let userDefined: Int32 = 4
        public static let unused: Int32 = 5
        public static let byte: Int32 = 6
    }

    public let bosID: Int32
    public let eosID: Int32
    public let unknownID: Int32
    /// Whether a space is put before the text (and after every user-defined piece), as llama.cpp does for
    /// SentencePiece vocabularies with `add_space_prefix`. False for Gemma.
    public let addSpacePrefix: Bool

    // All pieces' UTF-8 bytes back to back; piece `i` is `pieceBytes[pieceOffsets[i] ..< pieceOffsets[i + 1]]`.
    private let pieceBytes: [UInt8]
    private let pieceOffsets: [Int32]
    private let scores: [Float]
    private let types: [Int32]
    /// Open-addressing hash table (linear probing, load <= 1/2) from piece bytes to id. A slot holds the upper
    /// 32 bits of the key's hash and id + 1 (0: empty), so most failed lookups touch one cache line.
    private let table: [UInt64]
    /// Id of the byte piece "<0xNN>" for each byte value, or -1.
    private let byteTokens: [Int32]
    /// For byte pieces, the byte they stand for; -1 for other pieces.
    private let byteValues: [Int16]
    /// User-defined pieces with spaces escaped, grouped by their first byte, longest first.
    private let userDefinedByFirstByte: [[UserDefinedPiece]]
    /// Byte length of the longest piece: longer concatenations are never looked up.
    private let maxPieceLength: Int

    /// Builds the tokenizer from the three parallel GGUF arrays `tokenizer.ggml.tokens` (strings),
    /// `tokenizer.ggml.scores` (f32) and `tokenizer.ggml.token_type` (i32: 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte). When a piece appears twice the lower id wins.
    public init(tokens: [String], scores: [Float], types: [Int32], bosID: Int32, eosID: Int32, unknownID: Int32,
                addSpacePrefix: Bool = false) throws {
        let count = tokens.count
        guard count > 0 else { throw TokenizerError("empty vocabulary") }
        guard count < Int(Int32.max) else { throw TokenizerError("vocabulary of \(count) pieces is too large") }
        guard scores.count == count, types.count == count else {
            throw TokenizerError("vocabulary has \(count) pieces but \(scores.count) scores and \(types.count) types")
        }
        for (name, id) in [("BOS", bosID), ("EOS", eosID), ("unknown", unknownID)] where id < 0 || Int(id) >= count {
            throw TokenizerError("\(name) id \(id) outside the vocabulary of \(count) pieces")
        }
        self.bosID = bosID
        self.eosID = eosID
        self.unknownID = unknownID
        self.addSpacePrefix = addSpacePrefix
        self.scores = scores
        self.types = types

        var bytes: [UInt8] = []
        bytes.reserveCapacity(count * 8)
        var offsets: [Int32] = []
        offsets.reserveCapacity(count + 1)
        offsets.append(0)
        var maxLength = 0
        for token in tokens {
            bytes.append(contentsOf: token.utf8)
            guard bytes.count < Int(Int32.max) else { throw TokenizerError("vocabulary text too large") }
            offsets.append(Int32(bytes.count))
            maxLength = max(maxLength, token.utf8.count)
        }
        pieceBytes = bytes
        pieceOffsets = offsets
        maxPieceLength = maxLength

        var capacity = 16
        while capacity < 2 * count { capacity <<= 1 }
        var slots = [UInt64](repeating: 0, count: capacity)
        bytes.withUnsafeBufferPointer { b in
            let base = b.baseAddress!
            for id in 0 ..< count {
                let start = Int(offsets[id]), length = Int(offsets[id + 1]) - start
                let h = Self.hash(base + start, length)
                var slot = Int(truncatingIfNeeded: h) & (capacity - 1)
                var duplicate = false
                while slots[slot] != 0 {
                    let other = Int(slots[slot] & 0xFFFF_FFFF) - 1
                    let otherStart = Int(offsets[other])
                    if Int(offsets[other + 1]) - otherStart == length,
                       memcmpBytes(base + start, base + otherStart, length) {
                        duplicate = true
                        break
                    }
                    slot = (slot + 1) & (capacity - 1)
                }
                if !duplicate { slots[slot] = (h >> 32) << 32 | UInt64(id + 1) }
            }
        }
        table = slots

        var byteIDs = [Int32](repeating: -1, count: 256)
        var values = [Int16](repeating: -1, count: count)
        var userDefined = [[UserDefinedPiece]](repeating: [], count: 256)
        for id in 0 ..< count {
            let start = Int(offsets[id]), length = Int(offsets[id + 1]) - start
            switch types[id] {
            case TokenType.byte:
                // "<0xNN>"
                guard length == 6, bytes[start] == UInt8(ascii: "<"), bytes[start + 1] == UInt8(ascii: "0"),
                      bytes[start + 2] == UInt8(ascii: "x"), bytes[start + 5] == UInt8(ascii: ">"),
                      let high = hexDigit(bytes[start + 3]), let low = hexDigit(bytes[start + 4]) else {
                    throw TokenizerError("byte piece \(id) is \(tokens[id].debugDescription), not <0xNN>")
                }
                let value = high << 4 | low
                values[id] = Int16(value)
                if byteIDs[Int(value)] < 0 { byteIDs[Int(value)] = Int32(id) }
            case TokenType.userDefined where length > 0:
                let key = escapeSpaces(bytes[start ..< start + length])
                userDefined[Int(key[0])].append(UserDefinedPiece(id: Int32(id), bytes: key))
            default:
                break
            }
        }
        for b in 0 ..< 256 where !userDefined[b].isEmpty {
            // Longest first; among equal lengths the lower id (stable sort).
            userDefined[b] = userDefined[b].enumerated().sorted { l, r in
                let ll = l.element.bytes.count, rl = r.element.bytes.count
                return ll != rl ? ll > rl : l.offset < r.offset
            }.map(\.element)
        }
        byteTokens = byteIDs
        byteValues = values
        userDefinedByFirstByte = userDefined
    }

    public var vocabularySize: Int { scores.count }

    /// The raw vocabulary string of `id` ("▁the", "<0x0A>", "<bos>"); "" for an id outside the vocabulary.
    public func piece(_ id: Int32) -> String {
        guard id >= 0, Int(id) < vocabularySize else { return "" }
        let start = Int(pieceOffsets[Int(id)]), end = Int(pieceOffsets[Int(id) + 1])
        return String(decoding: pieceBytes[start ..< end], as: UTF8.self)
    }

    /// The GGUF token type of `id` (see `TokenType`), 0 for an id outside the vocabulary.
    public func tokenType(_ id: Int32) -> Int32 {
        guard id >= 0, Int(id) < vocabularySize else { return 0 }
        return types[Int(id)]
    }

    /// The id whose raw vocabulary string is exactly `piece`, of any type ("<start_of_turn>" gives 105 for
    /// Gemma 3), or nil.
    public func tokenID(forPiece piece: String) -> Int32? {
        var bytes = Array(piece.utf8)
        bytes.append(0)  // never part of the key; keeps the base address non-nil for ""
        let id = withView { view in
            bytes.withUnsafeBufferPointer { view.find($0.baseAddress!, $0.count - 1) }
        }
        return id >= 0 ? id : nil
    }

    /// The bytes `id` contributes to decoded text: a byte piece gives its byte, control and unknown pieces
    /// give nothing, other pieces give their text with "▁" turned back into " ". For streaming output, where
    /// a character may span several byte pieces.
    public func decodePiece(_ id: Int32) -> [UInt8] {
        var out: [UInt8] = []
        appendDecoded(id, to: &out)
        return out
    }

    /// Text of `ids`: the concatenation of `decodePiece` for each, invalid UTF-8 replaced by U+FFFD.
    public func decode(_ ids: [Int32]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(ids.count * 4)
        for id in ids { appendDecoded(id, to: &out) }
        return String(decoding: out, as: UTF8.self)
    }

    /// Token ids of `text` (no BOS or EOS added).
    public func encode(_ text: String) -> [Int32] {
        let input = escapeSpaces(text.utf8)
        guard !input.isEmpty else { return [] }
        var output: [Int32] = []
        output.reserveCapacity(input.count / 3 + 8)
        let userDefined = userDefinedByFirstByte
        withView { view in
            input.withUnsafeBufferPointer { text in
                var session = EncodingSession(view: view)
                // Cut user-defined pieces out; encode the fragments between them.
                var fragmentStart = 0
                var position = 0
                var previousWasPiece = true
                while position < text.count {
                    let first = Int(text[position])
                    if userDefined[first].isEmpty {
                        position += 1
                        continue
                    }
                    var matched: UserDefinedPiece?
                    for candidate in userDefined[first] where candidate.matches(text, at: position) {
                        matched = candidate
                        break
                    }
                    guard let piece = matched else {
                        position += 1
                        continue
                    }
                    if position > fragmentStart {
                        session.encodeFragment(UnsafeBufferPointer(rebasing: text[fragmentStart ..< position]),
                                               spacePrefix: addSpacePrefix && previousWasPiece, into: &output)
                    }
                    output.append(piece.id)
                    previousWasPiece = true
                    position += piece.bytes.count
                    fragmentStart = position
                }
                if fragmentStart < text.count {
                    session.encodeFragment(UnsafeBufferPointer(rebasing: text[fragmentStart...]),
                                           spacePrefix: addSpacePrefix && previousWasPiece, into: &output)
                }
            }
        }
        return output
    }

    // MARK: - Internals

    private func appendDecoded(_ id: Int32, to out: inout [UInt8]) {
        guard id >= 0, Int(id) < vocabularySize else { return }
        let i = Int(id)
        switch types[i] {
        case TokenType.control, TokenType.unknown:
            return
        case TokenType.byte:
            out.append(UInt8(truncatingIfNeeded: byteValues[i]))
        default:
            let end = Int(pieceOffsets[i + 1])
            var k = Int(pieceOffsets[i])
            while k < end {
                if pieceBytes[k] == 0xE2, k + 2 < end, pieceBytes[k + 1] == 0x96, pieceBytes[k + 2] == 0x81 {
                    out.append(0x20)  // "▁" -> " "
                    k += 3
                } else {
                    out.append(pieceBytes[k])
                    k += 1
                }
            }
        }
    }

    /// Runs `body` with raw views of the lookup tables (no bounds checks or retain traffic in the hot loop).
    private func withView<R>(_ body: (VocabularyView) -> R) -> R {
        pieceBytes.withUnsafeBufferPointer { bytes in
            pieceOffsets.withUnsafeBufferPointer { offsets in
                table.withUnsafeBufferPointer { table in
                    scores.withUnsafeBufferPointer { scores in
                        types.withUnsafeBufferPointer { types in
                            byteTokens.withUnsafeBufferPointer { byteTokens in
                                body(VocabularyView(bytes: bytes, offsets: offsets, table: table, scores: scores,
                                                    types: types, byteTokens: byteTokens, unknownID: unknownID,
                                                    maxPieceLength: maxPieceLength))
                            }
                        }
                    }
                }
            }
        }
    }

    /// FNV-1a over `count` bytes.
    fileprivate static func hash(_ p: UnsafePointer<UInt8>, _ count: Int) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for i in 0 ..< count {
            h = (h ^ UInt64(p[i])) &* 0x0000_0100_0000_01b3
        }
        return h ^ (h >> 29)
    }
}

extension SentencePieceTokenizer {
    /// Reads the vocabulary from GGUF metadata: `tokenizer.ggml.tokens`, `.scores`, `.token_type`,
    /// `.bos_token_id`, `.eos_token_id`, `.unknown_token_id`, `.add_space_prefix`. Absent keys take llama.cpp's
    /// defaults for SentencePiece vocabularies: scores 0, type normal, BOS 1, EOS 2, unknown 0, space prefix on.
    public convenience init(gguf file: GGUFFile) throws {
        let metadata = file.metadata
        if let model = metadata["tokenizer.ggml.model"]?.stringValue, model != "llama" {
            throw TokenizerError("tokenizer.ggml.model is \"\(model)\"; only \"llama\" (SentencePiece) is supported")
        }
        guard let tokenValues = metadata["tokenizer.ggml.tokens"]?.arrayValue else {
            throw TokenizerError("GGUF file has no tokenizer.ggml.tokens array")
        }
        var tokens: [String] = []
        tokens.reserveCapacity(tokenValues.count)
        for (i, value) in tokenValues.enumerated() {
            guard let s = value.stringValue else { throw TokenizerError("tokenizer.ggml.tokens[\(i)] is not a string") }
            tokens.append(s)
        }
        var scores = [Float](repeating: 0, count: tokens.count)
        if let values = metadata["tokenizer.ggml.scores"]?.arrayValue {
            guard values.count == tokens.count else {
                throw TokenizerError("\(values.count) scores for \(tokens.count) tokens")
            }
            for (i, value) in values.enumerated() {
                guard let d = value.doubleValue else { throw TokenizerError("tokenizer.ggml.scores[\(i)] is not a number") }
                scores[i] = Float(d)
            }
        }
        var types = [Int32](repeating: TokenType.normal, count: tokens.count)
        if let values = metadata["tokenizer.ggml.token_type"]?.arrayValue {
            guard values.count == tokens.count else {
                throw TokenizerError("\(values.count) token types for \(tokens.count) tokens")
            }
            for (i, value) in values.enumerated() {
                guard let t = value.intValue, let t32 = Int32(exactly: t) else {
                    throw TokenizerError("tokenizer.ggml.token_type[\(i)] is not an integer")
                }
                types[i] = t32
            }
        }
        func id(_ key: String, default value: Int32) throws -> Int32 {
            guard let v = metadata[key] else { return value }
            guard let i = v.intValue, let i32 = Int32(exactly: i) else { throw TokenizerError("\(key) is not an id") }
            return i32
        }
        try self.init(tokens: tokens, scores: scores, types: types,
                      bosID: try id("tokenizer.ggml.bos_token_id", default: 1),
                      eosID: try id("tokenizer.ggml.eos_token_id", default: 2),
                      unknownID: try id("tokenizer.ggml.unknown_token_id", default: 0),
                      addSpacePrefix: metadata["tokenizer.ggml.add_space_prefix"]?.boolValue ?? true)
    }
}

// MARK: - Encoding machinery

private func hexDigit(_ c: UInt8) -> UInt8? {
    switch c {
    case UInt8(ascii: "0") ... UInt8(ascii: "9"): return c - UInt8(ascii: "0")
    case UInt8(ascii: "A") ... UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
    case UInt8(ascii: "a") ... UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
    default: return nil
    }
}

/// `bytes` with every " " replaced by "▁" (E2 96 81).
private func escapeSpaces<C: Collection>(_ bytes: C) -> [UInt8] where C.Element == UInt8 {
    var out: [UInt8] = []
    out.reserveCapacity(bytes.count + bytes.count / 4)
    for b in bytes {
        if b == 0x20 { out.append(contentsOf: [0xE2, 0x96, 0x81]) } else { out.append(b) }
    }
    return out
}

/// A user-defined piece as it appears in escaped text.
private struct UserDefinedPiece: Sendable {
    let id: Int32
    let bytes: [UInt8]

    func matches(_ text: UnsafeBufferPointer<UInt8>, at position: Int) -> Bool {
        guard bytes.count <= text.count - position else { return false }
        for (k, b) in bytes.enumerated() where text[position + k] != b { return false }
        return true
    }
}

@inline(__always)
private func memcmpBytes(_ a: UnsafePointer<UInt8>, _ b: UnsafePointer<UInt8>, _ count: Int) -> Bool {
    for i in 0 ..< count where a[i] != b[i] { return false }
    return true
}

/// Raw pointers into the tokenizer's tables, valid only inside `withView`.
private struct VocabularyView {
    let bytes: UnsafeBufferPointer<UInt8>
    let offsets: UnsafeBufferPointer<Int32>
    let table: UnsafeBufferPointer<UInt64>
    let scores: UnsafeBufferPointer<Float>
    let types: UnsafeBufferPointer<Int32>
    let byteTokens: UnsafeBufferPointer<Int32>
    let unknownID: Int32
    let maxPieceLength: Int

    /// Id of the piece whose bytes are `p[0 ..< count]`, or -1.
    @inline(__always)
    func find(_ p: UnsafePointer<UInt8>, _ count: Int) -> Int32 {
        guard count <= maxPieceLength else { return -1 }
        let mask = table.count - 1
        let h = SentencePieceTokenizer.hash(p, count)
        let tag = (h >> 32) << 32
        var slot = Int(truncatingIfNeeded: h) & mask
        while true {
            let entry = table[slot]
            if entry == 0 { return -1 }
            if entry & 0xFFFF_FFFF_0000_0000 == tag {
                let id = Int(entry & 0xFFFF_FFFF) - 1
                let start = Int(offsets[id])
                if Int(offsets[id + 1]) - start == count, memcmpBytes(p, bytes.baseAddress! + start, count) {
                    return Int32(id)
                }
            }
            slot = (slot + 1) & mask
        }
    }

    /// Id of the piece `p[0 ..< count]` if it may appear in encoder output (normal, user-defined or unused), or -1.
    @inline(__always)
    func findMergeable(_ p: UnsafePointer<UInt8>, _ count: Int) -> Int32 {
        let id = find(p, count)
        guard id >= 0 else { return -1 }
        switch types[Int(id)] {
        case SentencePieceTokenizer.TokenType.normal, SentencePieceTokenizer.TokenType.userDefined,
             SentencePieceTokenizer.TokenType.unused:
            return id
        default:
            return -1
        }
    }
}

/// A symbol in the doubly linked list of the fragment being merged: bytes `start ..< start + length` of the
/// escaped fragment. A symbol merged into its left neighbour gets length 0.
private struct Symbol {
    var start: Int32
    var length: Int32
    var prev: Int32
    var next: Int32
}

/// A candidate merge of two adjacent symbols into the piece of `score`; `length` is the merged byte length,
/// which tells whether the candidate is stale (either side changed since it was queued).
private struct Bigram {
    var score: Float
    var left: Int32
    var right: Int32
    var length: Int32

    /// Priority order: higher score first, then the leftmost pair.
    @inline(__always)
    func comesBefore(_ other: Bigram) -> Bool {
        score > other.score || (score == other.score && left < other.left)
    }
}

/// Scratch buffers reused across the fragments of one `encode` call.
private struct EncodingSession {
    let view: VocabularyView
    var prefixed: [UInt8] = []
    var symbols: [Symbol] = []
    var heap = BigramHeap()

    init(view: VocabularyView) {
        self.view = view
    }

    /// Appends the ids of one non-empty fragment of escaped text (no user-defined pieces inside) to `output`,
    /// with a "▁" put in front if `spacePrefix`.
    mutating func encodeFragment(_ text: UnsafeBufferPointer<UInt8>, spacePrefix: Bool, into output: inout [Int32]) {
        if spacePrefix {
            var prefixed: [UInt8] = []
            swap(&prefixed, &self.prefixed)
            prefixed.removeAll(keepingCapacity: true)
            prefixed.append(contentsOf: [0xE2, 0x96, 0x81])
            prefixed.append(contentsOf: text)
            prefixed.withUnsafeBufferPointer { encodeFragment($0, spacePrefix: false, into: &output) }
            swap(&prefixed, &self.prefixed)
            return
        }
        let view = self.view
        // Work on local buffers (moved out of self, so the closures below do not overlap accesses to self).
        var symbols: [Symbol] = []
        var heap = BigramHeap()
        swap(&symbols, &self.symbols)
        swap(&heap, &self.heap)
        defer {
            swap(&symbols, &self.symbols)
            swap(&heap, &self.heap)
        }
        do {
            let base = text.baseAddress!
            let n = text.count

            // One symbol per UTF-8 character (a truncated sequence at the end becomes a shorter symbol).
            symbols.removeAll(keepingCapacity: true)
            symbols.reserveCapacity(n)
            var offset = 0
            while offset < n {
                let lead = base[offset]
                let width = lead < 0x80 ? 1 : lead >> 5 == 0b110 ? 2 : lead >> 4 == 0b1110 ? 3 : lead >> 3 == 0b11110 ? 4 : 1
                let length = min(width, n - offset)
                let index = Int32(symbols.count)
                symbols.append(Symbol(start: Int32(offset), length: Int32(length), prev: index - 1, next: index + 1))
                offset += length
            }
            symbols[symbols.count - 1].next = -1

            heap.items.removeAll(keepingCapacity: true)
            symbols.withUnsafeMutableBufferPointer { symbols in
                func tryAddBigram(_ left: Int32, _ right: Int32) {
                    guard left >= 0, right >= 0 else { return }
                    let l = symbols[Int(left)], r = symbols[Int(right)]
                    let length = Int(l.length + r.length)
                    let id = view.findMergeable(base + Int(l.start), length)
                    guard id >= 0 else { return }
                    heap.push(Bigram(score: view.scores[Int(id)], left: left, right: right, length: Int32(length)))
                }

                for i in 1 ..< symbols.count { tryAddBigram(Int32(i - 1), Int32(i)) }

                while let bigram = heap.pop() {
                    let left = Int(bigram.left), right = Int(bigram.right)
                    let leftLength = symbols[left].length, rightLength = symbols[right].length
                    // Skip candidates made stale by an earlier merge.
                    if leftLength == 0 || rightLength == 0 || leftLength + rightLength != bigram.length { continue }
                    symbols[left].length = leftLength + rightLength
                    symbols[right].length = 0
                    let next = symbols[right].next
                    symbols[left].next = next
                    if next >= 0 { symbols[Int(next)].prev = bigram.left }
                    tryAddBigram(symbols[left].prev, bigram.left)
                    tryAddBigram(bigram.left, next)
                }

                // Emit: each surviving symbol is a piece, or falls back to byte pieces.
                var i: Int32 = 0
                while i >= 0 {
                    let s = symbols[Int(i)]
                    let start = base + Int(s.start)
                    let id = view.findMergeable(start, Int(s.length))
                    if id >= 0 {
                        output.append(id)
                    } else {
                        for k in 0 ..< Int(s.length) {
                            let byteID = view.byteTokens[Int(start[k])]
                            output.append(byteID >= 0 ? byteID : view.unknownID)
                        }
                    }
                    i = s.next
                }
            }
        }
    }

}

/// Binary max-heap of bigrams in `Bigram.comesBefore` order.
private struct BigramHeap {
    var items: [Bigram] = []

    mutating func push(_ item: Bigram) {
        items.append(item)
        items.withUnsafeMutableBufferPointer { h in
            var child = h.count - 1
            while child > 0 {
                let parent = (child - 1) / 2
                guard item.comesBefore(h[parent]) else { break }
                h[child] = h[parent]
                child = parent
            }
            h[child] = item
        }
    }

    mutating func pop() -> Bigram? {
        guard let last = items.popLast() else { return nil }
        if items.isEmpty { return last }
        return items.withUnsafeMutableBufferPointer { h -> Bigram in
            let top = h[0]
            let n = h.count
            var index = 0
            while true {
                var child = 2 * index + 1
                if child >= n { break }
                if child + 1 < n, h[child + 1].comesBefore(h[child]) { child += 1 }
                guard h[child].comesBefore(last) else { break }
                h[index] = h[child]
                index = child
            }
            h[index] = last
            return top
        }
    }
}
