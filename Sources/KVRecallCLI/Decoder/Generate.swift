import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface
import KVRecallDecoder

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate text with Gemma 3, its global layers attending through KVRecall.",
        discussion: """
        The prompt (BOS + its tokens) is prefilled with exact attention; the global
        layers' keys, values and prefill queries go into a KV session, which builds
        the method's indexes; then each new token is decoded greedily, the global
        layers attending with --method. Text streams to standard output; prefill
        time, index build time and ms per token go to standard error (with auto,
        each head's plan too). With several methods (comma-separated), each
        continues from the same prefill. Gemma 3 270M's context is 32768 tokens:
        BOS + the prompt + --max-tokens must fit. An empty prompt generates from
        BOS alone (and says so); a prompt that is not UTF-8 is refused.

        Examples:
          kvrecall generate --prompt "The capital of France is" --max-tokens 16
          kvrecall generate --prompt-file Data/text/short.txt --max-tokens 32 \\
                            --method exact,retrieval
        """
    )

    @OptionGroup var modelOptions: ModelOptions
    @Option(help: "Prompt text.")
    var prompt: String?
    @Option(help: ArgumentHelp("Read the prompt from a UTF-8 file.", valueName: "file"))
    var promptFile: String?
    @Option(help: "Tokens to generate (greedy); stops early at the end-of-sequence token.")
    var maxTokens: Int = 32
    @OptionGroup var methodOptions: DecoderMethodOptions

    func validate() throws {
        if (prompt == nil) == (promptFile == nil) { throw ValidationError("give exactly one of --prompt and --prompt-file") }
        if maxTokens < 1 { throw ValidationError("--max-tokens must be at least 1 (got \(maxTokens))") }
    }

    func run() throws {
        let text = try prompt ?? readText(promptFile!)
        let model = try modelOptions.load()
        let ids = [model.tokenizer.bosID] + model.tokenizer.encode(text)
        if ids.count == 1 {
            // Not an error (an unconditioned sample is a use), but never without a word.
            note("the prompt is empty (\(promptFile.map { "file \($0)" } ?? "--prompt ''")): generating from BOS alone")
        }
        guard ids.count + maxTokens <= model.configuration.contextLength else {
            throw RunError("the prompt has \(ids.count) tokens; with --max-tokens \(maxTokens) it exceeds the context length \(model.configuration.contextLength)")
        }
        let methods = try methodOptions.methodList()
        let prompt = try Gemma3Sequence.prefillPrompt(model: model, tokens: ids, progress: ProgressBar("prefill").update)
        note("prefill: \(ids.count) tokens in \(fmt(prompt.seconds, 2)) s (\(fmt(Double(ids.count) / prompt.seconds, 1)) tokens/s)")

        for method in methods {
            let sequence = try Gemma3Sequence(model: model, options: methodOptions.options(for: method), restoring: prompt.state)
            defer { sequence.close() }
            let buildStart = monotonicNanos()
            try sequence.buildIndexes()
            let buildSeconds = Double(monotonicNanos() - buildStart) / 1e9
            if method == .auto {
                // What each head runs and why (the profile behind it: eval --json's "heads").
                for line in sequence.report() { note("[auto] " + (line.components(separatedBy: "; mass on").first ?? line)) }
            }
            if methods.count > 1 { print("[\(method.rawValue)] ", terminator: "") }
            // A long prompt is shown by its end only.
            print(text.count > 240 ? "…" + text.suffix(200) : text, terminator: "")
            fflush(stdout)
            var next = argmax(prompt.logits)
            var produced = 0
            var stepNanos: UInt64 = 0
            var pending: [UInt8] = []
            while produced < maxTokens {
                produced += 1
                if next == model.tokenizer.eosID { break }
                pending += model.tokenizer.decodePiece(next)
                // Stream whole UTF-8 characters only.
                if let s = String(validating: pending, as: UTF8.self) {
                    print(s, terminator: "")
                    fflush(stdout)
                    pending = []
                }
                guard produced < maxTokens else { break }
                let t0 = monotonicNanos()
                next = argmax(try sequence.step(next))
                stepNanos += monotonicNanos() - t0
            }
            if !pending.isEmpty { print(String(decoding: pending, as: UTF8.self), terminator: "") }
            print("")
            let steps = max(1, produced - 1)
            note("[\(method.rawValue)] index build \(fmt(buildSeconds, 2)) s, decode \(fmt(Double(stepNanos) / 1e6 / Double(steps), 1)) ms/token over \(steps) steps")
        }
    }
}
