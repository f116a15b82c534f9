import Foundation
import KVRecall

/// Landmark Attention's passkey test: a 5-digit key hidden at a random depth in repeated filler,
/// then the question; the model answers greedily and must repeat the key.
public struct PasskeyTest {
    public static let task = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there."
    public static let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    public static let question = "What is the pass key? The pass key is"

    public struct Trial: Sendable {
        public let key: Int
        /// Fraction of the filler placed before the key.
        public let depth: Double
        /// BOS + prompt tokens.
        public let ids: [Int32]
    }

    public let tokenizer: SentencePieceTokenizer

    public init(tokenizer: SentencePieceTokenizer) { self.tokenizer = tokenizer }

    static func needle(_ key: Int) -> String { "The pass key is \(key). Remember it. \(key) is the pass key." }

    /// The prompt text with `repeats` filler sentences, `before` of them ahead of the key.
    static func prompt(key: Int, repeats: Int, before: Int) -> String {
        let head = Array(repeating: filler, count: before).joined(separator: " ")
        let tail = Array(repeating: filler, count: repeats - before).joined(separator: " ")
        return [task, head, needle(key), tail, question].joined(separator: "\n")
    }

    /// A trial of about `context` tokens (BOS included), its key and depth drawn from `generator`.
    public func makeTrial(context: Int, generator: inout SeededGenerator) throws -> Trial {
        let key = Int.random(in: 10000...99999, using: &generator)
        let depth = Double.random(in: 0..<1, using: &generator)
        let fixed = tokenizer.encode(Self.prompt(key: key, repeats: 0, before: 0)).count + 1
        let perFiller = max(1, tokenizer.encode(Self.filler + " " + Self.filler).count - tokenizer.encode(Self.filler).count)
        guard context > fixed + perFiller else {
            throw DecoderError("a passkey context of \(context) tokens is too short (the task and question alone take \(fixed))")
        }
        var repeats = (context - fixed) / perFiller
        var ids: [Int32] = []
        // Tokenization at the joins can differ slightly from the estimate: shrink until it fits.
        while repeats > 0 {
            let before = Int((Double(repeats) * depth).rounded(.down))
            ids = [tokenizer.bosID] + tokenizer.encode(Self.prompt(key: key, repeats: repeats, before: before))
            if ids.count <= context { break }
            repeats -= max(1, (ids.count - context) / perFiller)
        }
        return Trial(key: key, depth: depth, ids: ids)
    }

    /// True when the answer's first number is the key.
    public static func isCorrect(answer: String, key: Int) -> Bool {
        let digits = answer.drop(while: { !$0.isNumber }).prefix(while: { $0.isNumber })
        return String(digits) == String(key)
    }
}

/// Results of one method over the trials of one context length.
public struct PasskeyResult: Sendable {
    public var method: String
    public var context: Int
    public var trials = 0
    public var correct = 0
    public var answers: [String] = []
}

extension PasskeyTest {
    /// Runs `trials` trials per context length; each trial is prefilled once (exact attention)
    /// and answered by every method from that prefill, greedily, `answerTokens` tokens.
    public func run(model: Gemma3Model, contexts: [Int], trials: Int, seed: UInt64, methods: [DecoderAttentionOptions],
                    answerTokens: Int = 8, log: ((String) -> Void)? = nil) throws -> [PasskeyResult] {
        var results: [PasskeyResult] = []
        for context in contexts {
            var generator = SeededGenerator(seed: seed &+ UInt64(context))
            var perMethod = methods.map { PasskeyResult(method: $0.method.rawValue, context: context) }
            for trial in 0..<trials {
                let t = try makeTrial(context: context, generator: &generator)
                let prompt = try Gemma3Sequence.prefillPrompt(model: model, tokens: t.ids)
                for (m, options) in methods.enumerated() {
                    let sequence = try Gemma3Sequence(model: model, options: options, restoring: prompt.state)
                    defer { sequence.close() }
                    try sequence.buildIndexes()
                    var answer: [Int32] = []
                    var next = argmax(prompt.logits)
                    for _ in 0..<answerTokens {
                        answer.append(next)
                        if next == tokenizer.eosID { break }
                        next = argmax(try sequence.step(next))
                    }
                    let text = tokenizer.decode(answer)
                    let ok = Self.isCorrect(answer: text, key: t.key)
                    perMethod[m].trials += 1
                    if ok { perMethod[m].correct += 1 }
                    perMethod[m].answers.append(text)
                    log?("context \(context) trial \(trial + 1)/\(trials) (\(t.ids.count) tokens, depth \(String(format: "%.2f", t.depth)), key \(t.key)) \(options.method.rawValue): \(ok ? "correct" : "wrong") \(text.debugDescription)")
                }
            }
            results.append(contentsOf: perMethod)
        }
        return results
    }
}
