import Foundation
import KVRecallDecoder
import KVRecallTestSupport
import Testing

/// A hand-made vocabulary: <pad> <eos> <bos> <unk>, the 256 byte pieces, then `pieces` (normal unless listed in
/// `userDefined`) with the given scores.
private struct ToyVocabulary {
    var tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    var scores: [Float] = [0, 0, 0, 0]
    var types: [Int32] = [3, 3, 3, 2]

    init(_ pieces: [(String, Float)], userDefined: [String] = [], byteFallback: Bool = true) {
        if byteFallback {
            for b in 0 ..< 256 {
                tokens.append(String(format: "<0x%02X>", b))
                scores.append(0)
                types.append(6)
            }
        }
        for (piece, score) in pieces {
            tokens.append(piece)
            scores.append(score)
            types.append(1)
        }
        for piece in userDefined {
            tokens.append(piece)
            scores.append(-1000)
            types.append(4)
        }
    }

    func tokenizer(addSpacePrefix: Bool = false) throws -> SentencePieceTokenizer {
        try SentencePieceTokenizer(tokens: tokens, scores: scores, types: types, bosID: 2, eosID: 1, unknownID: 3,
                                   addSpacePrefix: addSpacePrefix)
    }
}

extension SentencePieceTokenizer {
    /// The raw pieces of `text`'s ids, for readable expectations.
    fileprivate func pieces(_ text: String) -> [String] { encode(text).map { piece($0) } }
}

/// Single characters that every toy vocabulary has.
private let letters: [(String, Float)] = ["▁", "a", "b", "c", "d", "e", "x", "\t"].map { ($0, -10) }

@Suite struct TokenizerToyTests {
    @Test func mergesTheHighestScoringPairFirst() throws {
        // "bc" outscores "ab": a|bc, although "ab" is leftmost.
        var tok = try ToyVocabulary(letters + [("ab", -2), ("bc", -1)]).tokenizer()
        #expect(tok.pieces("abc") == ["a", "bc"])
        // And the other way round.
        tok = try ToyVocabulary(letters + [("ab", -1), ("bc", -2)]).tokenizer()
        #expect(tok.pieces("abc") == ["ab", "c"])
        // Merged symbols keep merging: a + bc = abc.
        tok = try ToyVocabulary(letters + [("ab", -2), ("bc", -1), ("abc", -3)]).tokenizer()
        #expect(tok.pieces("abc") == ["abc"])
        // BPE, not longest match: "bc" wins first, and neither "abc" nor "bcd" is a piece, so "abcd" never forms.
        tok = try ToyVocabulary(letters + [("ab", -2), ("cd", -2), ("bc", -1), ("abcd", -0.5)]).tokenizer()
        #expect(tok.pieces("abcd") == ["a", "bc", "d"])
    }

    @Test func equalScoresMergeTheLeftmostPair() throws {
        let tok = try ToyVocabulary(letters + [("ab", -1), ("bc", -1)]).tokenizer()
        #expect(tok.pieces("abc") == ["ab", "c"])
        #expect(tok.pieces("abcabc") == ["ab", "c", "ab", "c"])
        // "aaa" with only "aa": leftmost pair first.
        let tok2 = try ToyVocabulary(letters + [("aa", -1)]).tokenizer()
        #expect(tok2.pieces("aaa") == ["aa", "a"])
        #expect(tok2.pieces("aaaa") == ["aa", "aa"])
    }

    @Test func spacesBecomeLowerOneEighthBlocks() throws {
        let tok = try ToyVocabulary(letters + [("▁b", -1), ("▁▁", -5)]).tokenizer()
        #expect(tok.pieces("a b") == ["a", "▁b"])
        #expect(tok.pieces(" ") == ["▁"])
        // "▁b" (-1) beats "▁▁" (-5); the leftmost pair of spaces goes next.
        #expect(tok.pieces("a   b") == ["a", "▁▁", "▁b"])
        #expect(tok.decode(tok.encode("a   b")) == "a   b")
        // No prefix space for Gemma; with addSpacePrefix the text starts with one.
        #expect(tok.pieces("b") == ["b"])
        #expect(try ToyVocabulary(letters + [("▁b", -1)]).tokenizer(addSpacePrefix: true).pieces("b") == ["▁b"])
    }

    @Test func unknownCharactersFallBackToBytes() throws {
        let tok = try ToyVocabulary(letters).tokenizer()
        let ids = tok.encode("a😀")
        #expect(ids.count == 5)
        #expect(ids.dropFirst().map { tok.piece($0) } == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"])
        #expect(tok.decode(ids) == "a😀")
        // Without byte pieces every byte becomes the unknown id.
        let noBytes = try ToyVocabulary(letters, byteFallback: false).tokenizer()
        #expect(noBytes.encode("é") == [3, 3])
        #expect(noBytes.encode("ab") == noBytes.encode("a") + noBytes.encode("b"))
    }

    @Test func userDefinedPiecesAreCutOutFirstButControlPiecesAreNot() throws {
        let tok = try ToyVocabulary(letters + [("▁a", -1), ("<", -10), (">", -10), ("o", -10), ("s", -10)],
                                    userDefined: ["\n", "\n\n", "  ", "<b>"]).tokenizer()
        #expect(tok.pieces("a\n\n\nb") == ["a", "\n\n", "\n", "b"])
        // User-defined space runs are stored with real spaces (as the GGUF converter writes them).
        #expect(tok.pieces("x   a") == ["x", "  ", "▁a"])
        #expect(tok.pieces("x<b>a") == ["x", "<b>", "a"])
        // "<bos>" in the text is plain text, not the BOS id.
        #expect(!tok.encode("<bos>").contains(tok.bosID))
        #expect(tok.decode(tok.encode("<bos>")) == "<bos>")
    }

    @Test func decodeHandlesBytesControlAndInvalidUTF8() throws {
        let v = ToyVocabulary(letters + [("▁ab", -1)])
        let tok = try v.tokenizer()
        let id = { (piece: String) in tok.tokenID(forPiece: piece)! }
        #expect(tok.decode([id("<bos>"), id("a"), id("▁ab"), id("<eos>"), id("<pad>"), id("<unk>")]) == "a ab")
        // "é" as two byte pieces.
        #expect(tok.decode([id("<0xC3>"), id("<0xA9>")]) == "é")
        #expect(tok.decodePiece(id("<0xC3>")) == [0xC3])
        #expect(tok.decodePiece(id("<bos>")) == [])
        #expect(tok.decodePiece(id("▁ab")) == Array(" ab".utf8))
        // A lone continuation byte is replaced, not dropped silently.
        #expect(tok.decode([id("a"), id("<0xA9>"), id("b")]) == "a\u{FFFD}b")
        // Ids outside the vocabulary contribute nothing.
        #expect(tok.decode([-1, Int32(tok.vocabularySize), id("a")]) == "a")
        #expect(tok.piece(-1) == "")
        #expect(tok.piece(2) == "<bos>")
        #expect(tok.tokenID(forPiece: "zzz") == nil)
        #expect(tok.vocabularySize == v.tokens.count)
    }

    @Test(arguments: [
        "", " ", "  ", "a", "\n", "\n\n\n\n", "\t\t", "a\tb\n c  d   e",
        "line one\nline two\r\n\nthird   line with    spaces\t\ttabs ",
        "Ünïcödé: 日本語, Ελληνικά, русский, עברית, emoji 😀👍🏽👨‍👩‍👧 🇫🇷, e\u{301}, \u{200B}zero width",
        "\u{1}\u{7F} control \u{FEFF} bom",
    ])
    func roundTrips(_ text: String) throws {
        let tok = try ToyVocabulary(letters + [("▁a", -1), ("ab", -2), ("▁▁", -3)], userDefined: ["\n", "\n\n"])
            .tokenizer()
        #expect(tok.decode(tok.encode(text)) == text)
        var streamed: [UInt8] = []
        for id in tok.encode(text) { streamed += tok.decodePiece(id) }
        #expect(String(decoding: streamed, as: UTF8.self) == text)
    }

    @Test func literalBlocksDecodeAsSpaces() throws {
        // SentencePiece cannot tell a "▁" typed in the text from an escaped space: the one lossy case.
        let tok = try ToyVocabulary(letters).tokenizer()
        #expect(tok.encode("a▁b") == tok.encode("a b"))
        #expect(tok.decode(tok.encode("a▁b")) == "a b")
    }

    @Test func rejectsInconsistentVocabularies() {
        #expect(throws: TokenizerError.self) {
            try SentencePieceTokenizer(tokens: ["a", "b"], scores: [0], types: [1, 1], bosID: 0, eosID: 0, unknownID: 0)
        }
        #expect(throws: TokenizerError.self) {
            try SentencePieceTokenizer(tokens: [], scores: [], types: [], bosID: 0, eosID: 0, unknownID: 0)
        }
        #expect(throws: TokenizerError.self) {
            try SentencePieceTokenizer(tokens: ["a"], scores: [0], types: [1], bosID: 5, eosID: 0, unknownID: 0)
        }
        #expect(throws: TokenizerError.self) {
            try SentencePieceTokenizer(tokens: ["<0xZZ>"], scores: [0], types: [6], bosID: 0, eosID: 0, unknownID: 0)
        }
    }

    @Test func readsTheVocabularyFromGGUFMetadata() throws {
        let directory = TemporaryDirectory("kvrecall-tokenizer")
        let v = ToyVocabulary(letters + [("▁a", -1), ("ab", -2)], userDefined: ["\n"])
        var writer = GGUFWriter()
        writer.set("tokenizer.ggml.model", .string("llama"))
        writer.set("tokenizer.ggml.tokens", .array(v.tokens.map { .string($0) }))
        writer.set("tokenizer.ggml.scores", .array(v.scores.map { .float32($0) }))
        writer.set("tokenizer.ggml.token_type", .array(v.types.map { .int32($0) }))
        writer.set("tokenizer.ggml.bos_token_id", .uint32(2))
        writer.set("tokenizer.ggml.eos_token_id", .uint32(1))
        writer.set("tokenizer.ggml.unknown_token_id", .uint32(3))
        writer.set("tokenizer.ggml.add_space_prefix", .bool(false))
        let path = directory.path + "/toy.gguf"
        try writer.write(to: path)
        let file = try GGUFFile(path: path)
        defer { file.close() }
        let tok = try SentencePieceTokenizer(gguf: file)
        let reference = try v.tokenizer()
        #expect(tok.vocabularySize == v.tokens.count)
        #expect(tok.bosID == 2 && tok.eosID == 1 && tok.unknownID == 3 && !tok.addSpacePrefix)
        for text in ["ab a\nab 😀", " a a ", "xyz\n\n"] {
            #expect(tok.encode(text) == reference.encode(text))
        }

        // Absent keys take llama.cpp's defaults: BOS 1, EOS 2, unknown 0, space prefix on, all pieces normal.
        var bare = GGUFWriter()
        bare.set("tokenizer.ggml.tokens", .array(["<unk>", "a", "b", "▁a"].map { .string($0) }))
        let barePath = directory.path + "/bare.gguf"
        try bare.write(to: barePath)
        let bareFile = try GGUFFile(path: barePath)
        defer { bareFile.close() }
        let bareTok = try SentencePieceTokenizer(gguf: bareFile)
        #expect(bareTok.bosID == 1 && bareTok.eosID == 2 && bareTok.unknownID == 0 && bareTok.addSpacePrefix)
        #expect(bareTok.pieces("a") == ["▁a"])

        var other = GGUFWriter()
        other.set("tokenizer.ggml.model", .string("gpt2"))
        other.set("tokenizer.ggml.tokens", .array([.string("a")]))
        let otherPath = directory.path + "/gpt2.gguf"
        try other.write(to: otherPath)
        let otherFile = try GGUFFile(path: otherPath)
        defer { otherFile.close() }
        #expect(throws: TokenizerError.self) { try SentencePieceTokenizer(gguf: otherFile) }
    }
}

// MARK: - Gemma 3 270M's real vocabulary

/// `$KVRECALL_MODELS/gemma-3-270m-q4_k_m.gguf`, else `~/.cache/kvrecall/models/gemma-3-270m-q4_k_m.gguf`.
private let gemmaModelPath: String = {
    let env = ProcessInfo.processInfo.environment
    let directory = env["KVRECALL_MODELS"].flatMap { $0.isEmpty ? nil : $0 }
        ?? NSHomeDirectory() + "/.cache/kvrecall/models"
    return directory + "/gemma-3-270m-q4_k_m.gguf"
}()

private let gemmaModelPresent = FileManager.default.fileExists(atPath: gemmaModelPath)

/// Every .txt file under the repository's Data/ folder.
private let dataTextFiles: [String] = {
    let root = repositoryDataDirectory()
    guard let walker = FileManager.default.enumerator(atPath: root) else { return [] }
    return walker.compactMap { $0 as? String }.filter { $0.hasSuffix(".txt") }.sorted().map { root + "/" + $0 }
}()

/// Loaded once and shared by the tests below.
private let gemmaTokenizer: Result<SentencePieceTokenizer, Error> = Result(catching: {
    let file = try GGUFFile(path: gemmaModelPath)
    defer { file.close() }
    return try SentencePieceTokenizer(gguf: file)
})

private let paragraph = """
    The Eiffel Tower, completed in 1889 for the Exposition Universelle, is 330 m tall — about the height of an \
    81-storey building.  It was the world's tallest man-made structure for 41 years.\n\n\tCafé prices near the \
    Champ-de-Mars: €4.50 for an espresso, ¥600 in Tokyo; 温度は25°C。 😀🎉\r\nFin.\u{20}\u{20}\u{20}
    """

@Suite(.enabled(if: gemmaModelPresent, "Gemma 3 270M not found; run Tools/fetch_model.sh"))
struct TokenizerGemmaTests {
    @Test func vocabulary() throws {
        let tok = try gemmaTokenizer.get()
        #expect(tok.vocabularySize == 262_144)
        #expect(tok.bosID == 2 && tok.eosID == 1 && tok.unknownID == 3 && !tok.addSpacePrefix)
        #expect(tok.tokenID(forPiece: "<start_of_turn>") == 105)
        #expect(tok.tokenID(forPiece: "<end_of_turn>") == 106)
        #expect(tok.piece(2) == "<bos>")
    }

    /// Expected ids come from the `sentencepiece` Python library, with a BPE ModelProto built from this GGUF's
    /// tokens/scores/types (byte_fallback on, identity normalizer, no dummy prefix, user-defined "  " pieces turned
    /// back into "▁▁"), which also agreed id for id with this tokenizer on ~255K characters of mixed text.
    /// "The capital of France is" matches Gemma 3's published tokenization (after BOS 2).
    @Test(arguments: [
        ("The capital of France is", [818, 5279, 529, 7001, 563]),
        ("Hello,  world!\n\n\tTabs\t\tand  spaces   ",
         [9259, 236764, 138, 12392, 236888, 108, 255968, 76222, 255969, 624, 138, 35220, 139]),
        ("café 😀 naïve 12345.67",
         [123125, 236859, 163543, 120362, 236743, 236770, 236778, 236800, 236812, 236810, 236761, 236825, 236832]),
        ("𠀀𪛖 \u{E0001} \u{1}",
         [478, 398, 366, 366, 478, 408, 393, 388, 236743, 481, 398, 366, 367, 236743, 249732]),
        ("Ceci n'est pas une pipe.\r\nÜber <b>alles</b>",
         [236780, 38863, 538, 236789, 598, 2982, 3037, 14228, 236761, 251, 107, 107081, 236743, 200, 26861, 209]),
    ] as [(String, [Int32])])
    func expectedIDs(_ text: String, _ ids: [Int32]) throws {
        let tok = try gemmaTokenizer.get()
        #expect(tok.encode(text) == ids)
        #expect(tok.decode(ids) == text)
    }

    @Test func paragraphRoundTrips() throws {
        let tok = try gemmaTokenizer.get()
        let ids = tok.encode(paragraph)
        #expect(ids.count > 40 && ids.count < paragraph.count)
        #expect(tok.decode(ids) == paragraph)
        #expect(tok.decode([tok.bosID] + ids + [tok.eosID]) == paragraph)
    }

    @Test(.enabled(if: !dataTextFiles.isEmpty, "no .txt file under Data/"))
    func dataFilesRoundTrip() throws {
        let tok = try gemmaTokenizer.get()
        for path in dataTextFiles {
            let text = try String(contentsOfFile: path, encoding: .utf8)
            let ids = tok.encode(text)
            #expect(tok.decode(ids) == text, "\(path)")
            #expect(text.isEmpty || ids.count < text.utf8.count, "\(path)")
        }
    }
}
