import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface
import KVRecallDecoder

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Judge attention methods by the model's quality: perplexity, or the passkey test.",
        discussion: """
        Perplexity (--text FILE): tokens are BOS + the file's tokenization.
        ids[0..<P] are prefilled with exact attention (--prefill P), the method
        builds its indexes, then ids[P..<P+T] (--tokens T) are scored
        teacher-forced, one decode step per token: each token predicted from
        everything before it, the first from the prefill's last position. --fidelity
        adds attention-level means (recall of each query head's exact top-k,
        attention mass, keys scanned, output error) over global layers, query heads
        and steps.

        Passkey (--passkey): Landmark Attention's test. A 5-digit key is hidden at a
        random depth in repeated filler of about --context tokens; the model answers
        greedily and must repeat the key. Each trial is prefilled once and answered
        by every method in --method.

        Long generations: --tokens in the thousands after a short --prefill is
        the benchmark of refreshes (each head's plan and index are made again
        as decoding appends keys; --refresh-fraction, docs/BENCHMARKS.md).

        Several methods (comma-separated, or 'all') share one prefill and are
        scored token by token in turn (each token decoded by every method
        before the next), so their ms/token meet the same load; each method's
        data then leaves the caches between its steps, and background refreshes
        of one method run beside the others' steps (--sequential: one method
        after another). Gemma 3
        270M's context is 32768 tokens: --prefill + --tokens, and each --context
        length, must fit.

        JSON (--json): perplexity {"method", "prefill_tokens", "scored_tokens",
        "perplexity", "top1_accuracy", "mean_nll", "prefill_s", "index_build_s",
        "decode_ms_per_token", "global_attention_ms_per_token", "refreshes",
        "heads", "heads_after", "attention": {...}}
        (an array for several methods); passkey {"method", "results": [{"context",
        "trials", "correct"}]} (an array for several methods).

        Examples:
          kvrecall eval --text Data/text/short.txt --prefill 1024 --tokens 256 \\
                        --method exact,retrieval --fidelity
          kvrecall eval --text options.txt --prefill 1024 --tokens 8192 \\
                        --method retrieval
          kvrecall eval --passkey --context 1024,4096 --trials 4 \\
                        --method exact,retrieval --json
        """
    )

    @OptionGroup var modelOptions: ModelOptions
    @Option(help: ArgumentHelp("UTF-8 text to score (perplexity mode).", valueName: "file"))
    var text: String?
    @Option(help: "Tokens prefilled with exact attention (BOS included).")
    var prefill: Int?
    @Option(help: "Tokens scored after the prefill, one decode step each.")
    var tokens: Int?
    @Flag(help: "Also measure attention fidelity against exact attention (slower).")
    var fidelity = false
    @Flag(help: "Perplexity: score the methods one after another instead of token by token in turn (each method's background refreshes then run beside its own steps only).")
    var sequential = false
    @Flag(help: "Run the passkey test instead of perplexity.")
    var passkey = false
    @Option(help: "Passkey: context lengths in tokens, comma-separated.")
    var context: String = "1024,4096"
    @Option(help: "Passkey: trials per context length.")
    var trials: Int = 4
    @Option(help: "Passkey: seed of the keys and depths.")
    var seed: UInt64 = 1
    @Flag(help: "Print JSON on standard output.")
    var json = false
    @OptionGroup var methodOptions: DecoderMethodOptions

    func validate() throws {
        if passkey {
            if text != nil { throw ValidationError("--passkey and --text are exclusive") }
            let lengths = try contextLengths()
            if lengths.isEmpty { throw ValidationError("--context needs at least one length") }
            if trials < 1 { throw ValidationError("--trials must be at least 1 (got \(trials))") }
        } else {
            guard text != nil else { throw ValidationError("give --text FILE (perplexity) or --passkey") }
            guard let prefill, let tokens else { throw ValidationError("perplexity needs --prefill P and --tokens T") }
            if prefill < 1 { throw ValidationError("--prefill must be at least 1 (got \(prefill))") }
            if tokens < 1 { throw ValidationError("--tokens must be at least 1 (got \(tokens))") }
        }
    }

    func contextLengths() throws -> [Int] {
        try context.split(separator: ",").map {
            guard let n = Int($0.trimmingCharacters(in: .whitespaces)), n >= 64 else {
                throw ValidationError("--context must list token counts of at least 64, comma-separated (got '\(context)')")
            }
            return n
        }
    }

    func run() throws {
        let model = try modelOptions.load()
        let methods = try methodOptions.methodList()
        if passkey {
            try runPasskey(model: model, methods: methods)
        } else {
            try runPerplexity(model: model, methods: methods)
        }
    }

    func runPerplexity(model: Gemma3Model, methods: [AttentionMethod]) throws {
        let path = text!
        let ids = [model.tokenizer.bosID] + model.tokenizer.encode(try readText(path))
        let evaluation: PerplexityEvaluation
        do {
            evaluation = try PerplexityEvaluation(model: model, ids: ids, prefill: prefill!, scored: tokens!)
        } catch let error as DecoderError {
            throw RunError("\(path): \(error.message)")
        }
        let prefillState = try evaluation.runPrefill(progress: ProgressBar("prefill").update)
        note("prefill: \(prefill!) tokens in \(fmt(prefillState.seconds, 2)) s")
        func noteScore(_ report: PerplexityReport) {
            note("[\(report.method)] perplexity \(fmt(report.perplexity, 3)), top-1 \(fmt(report.top1Accuracy, 3)), index build \(fmt(report.indexBuildSeconds, 2)) s, \(fmt(report.decodeMsPerToken, 1)) ms/token, \(report.refreshes) refreshes")
        }
        var reports: [PerplexityReport] = []
        if sequential {
            for method in methods {
                reports.append(try evaluation.score(options: methodOptions.options(for: method), from: prefillState, fidelity: fidelity,
                                                    progress: ProgressBar("score \(method.rawValue)").update))
                noteScore(reports.last!)
            }
        } else {
            reports = try evaluation.score(methods: methods.map(methodOptions.options(for:)), from: prefillState, fidelity: fidelity,
                                           progress: ProgressBar("score \(methods.map(\.rawValue).joined(separator: ","))").update)
            reports.forEach(noteScore)
        }
        if json {
            print(try jsonString(reports.count == 1 ? reports[0].json : reports.map(\.json) as Any))
            return
        }
        let exact = reports.first { $0.method == "exact" }
        var header = ["method", "perplexity", "vs_exact", "top1", "mean_nll", "build_s", "ms/token", "attn_ms"]
        if fidelity { header += ["recall", "attn_mass", "scanned", "out_err"] }
        var table = TextTable(header)
        for r in reports {
            var row = [r.method, fmt(r.perplexity, 3), exact.map { fmt((r.perplexity / $0.perplexity - 1) * 100, 2) + "%" } ?? "",
                       fmt(r.top1Accuracy, 3), fmt(r.meanNLL, 4), fmt(r.indexBuildSeconds, 2), fmt(r.decodeMsPerToken, 1),
                       fmt(r.globalAttentionMsPerToken, 2)]
            if let f = r.fidelity {
                row += [fmt(f.recall, 3), fmt(f.attentionMass, 3), fmt(f.keysScannedFraction, 4), fmt(f.outputError, 3)]
            }
            table.add(row)
        }
        print("\(path): prefill \(prefill!) tokens (\(fmt(prefillState.seconds, 2)) s), scored \(tokens!)")
        print(table.render())
    }

    func runPasskey(model: Gemma3Model, methods: [AttentionMethod]) throws {
        let test = PasskeyTest(tokenizer: model.tokenizer)
        let lengths = try contextLengths()
        if let longest = lengths.max(), longest + 16 > model.configuration.contextLength {
            throw RunError("--context \(longest) exceeds the model's context length \(model.configuration.contextLength)")
        }
        let results = try test.run(model: model, contexts: lengths, trials: trials, seed: seed,
                                   methods: methods.map(methodOptions.options(for:)), log: json ? nil : note)
        if json {
            let objects: [[String: Any]] = methods.map { m in
                ["method": m.rawValue,
                 "results": results.filter { $0.method == m.rawValue }.map { ["context": $0.context, "trials": $0.trials, "correct": $0.correct] }]
            }
            print(try jsonString(objects.count == 1 ? objects[0] : objects as Any))
            return
        }
        var table = TextTable(["method"] + lengths.map { "\($0) tokens" })
        for m in methods {
            let cells = lengths.map { n -> String in
                let r = results.first { $0.method == m.rawValue && $0.context == n }!
                return "\(r.correct)/\(r.trials)"
            }
            table.add([m.rawValue] + cells)
        }
        print(table.render())
    }
}
