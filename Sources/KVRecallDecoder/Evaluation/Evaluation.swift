import Foundation
import KVRecall

/// Attention-level diagnostics of a decode run: means over global layers, query heads and steps,
/// against exact attention over the session's keys computed on the side.
public struct AttentionFidelity: Sendable {
    public var recall = 0.0
    public var attentionMass = 0.0
    public var keysScannedFraction = 0.0
    public var outputError = 0.0
    public var samples = 0
}

/// Teacher-forced scoring of one method.
public struct PerplexityReport: Sendable {
    public var method: String
    public var prefillTokens: Int
    public var scoredTokens: Int
    public var perplexity: Double
    public var top1Accuracy: Double
    public var meanNLL: Double
    public var prefillSeconds: Double
    public var indexBuildSeconds: Double
    public var decodeMsPerToken: Double
    /// The part of a decode step spent in the session's attention of the global layers.
    public var globalAttentionMsPerToken: Double
    public var fidelity: AttentionFidelity?
    /// Per global layer (named by the model's block: "layer 5 head 0") and KV head: what ran (`auto`'s
    /// policy and why), the index and its calibration.
    public var heads: [String] = []
    /// The same after the last step (refreshes show there), and the refreshes installed over all heads.
    public var headsAfter: [String] = []
    public var refreshes = 0

    public var json: [String: Any] {
        var object: [String: Any] = [
            "method": method, "prefill_tokens": prefillTokens, "scored_tokens": scoredTokens,
            "perplexity": perplexity, "top1_accuracy": top1Accuracy, "mean_nll": meanNLL,
            "prefill_s": prefillSeconds, "index_build_s": indexBuildSeconds, "decode_ms_per_token": decodeMsPerToken,
            "global_attention_ms_per_token": globalAttentionMsPerToken, "heads": heads,
            "heads_after": headsAfter, "refreshes": refreshes,
        ]
        if let f = fidelity {
            object["attention"] = ["recall": f.recall, "attention_mass": f.attentionMass,
                                   "keys_scanned_fraction": f.keysScannedFraction, "output_error": f.outputError]
        }
        return object
    }
}

/// -log softmax(logits)[target] and whether `target` is the arg-max (ties: lowest id).
func negativeLogLikelihood(_ logits: ArraySlice<Float>, target: Int) -> (nll: Double, top1: Bool) {
    var peak = -Float.infinity, best = logits.startIndex
    for i in logits.indices where logits[i] > peak {
        peak = logits[i]
        best = i
    }
    var sum = 0.0
    for x in logits { sum += exp(Double(x - peak)) }
    let lse = Double(peak) + log(sum)
    return (lse - Double(logits[logits.startIndex + target]), best - logits.startIndex == target)
}

/// Greedy choice: the arg-max id (ties: lowest id).
public func argmax(_ logits: [Float]) -> Int32 {
    var peak = -Float.infinity, best = 0
    for (i, x) in logits.enumerated() where x > peak {
        peak = x
        best = i
    }
    return Int32(best)
}

func seconds(since start: UInt64) -> Double { Double(monotonicNanos() - start) / 1e9 }

/// Perplexity evaluation: prefill `ids[0..<prefill]` once with exact attention, then for each
/// method build its indexes and score `ids[prefill..<prefill+scored]` teacher-forced, one decode
/// step per token (each token predicted from everything before it, the first from the prefill's
/// last position); several methods step token by token in turn.
public struct PerplexityEvaluation {
    public let model: Gemma3Model
    public let ids: [Int32]
    public let prefill: Int
    public let scored: Int

    public init(model: Gemma3Model, ids: [Int32], prefill: Int, scored: Int) throws {
        guard prefill >= 1 else { throw DecoderError("--prefill must be at least 1") }
        guard scored >= 1 else { throw DecoderError("--tokens must be at least 1") }
        guard prefill + scored <= ids.count else {
            throw DecoderError("the text has \(ids.count) tokens (with BOS); --prefill \(prefill) + --tokens \(scored) needs \(prefill + scored)")
        }
        guard prefill + scored <= model.configuration.contextLength else {
            throw DecoderError("--prefill + --tokens = \(prefill + scored) exceeds the model's context length \(model.configuration.contextLength)")
        }
        self.model = model
        self.ids = ids
        self.prefill = prefill
        self.scored = scored
    }

    /// The shared prefill of `ids[0..<prefill]`.
    public func runPrefill(progress: ((Int, Int) -> Void)? = nil) throws -> PrefilledPrompt {
        try Gemma3Sequence.prefillPrompt(model: model, tokens: Array(ids[0..<prefill]), progress: progress)
    }

    /// Scores one method from a shared prefill.
    public func score(options: DecoderAttentionOptions, from prefillState: PrefilledPrompt,
                      fidelity: Bool, progress: ((Int, Int) -> Void)? = nil) throws -> PerplexityReport {
        try score(methods: [options], from: prefillState, fidelity: fidelity, progress: progress)[0]
    }

    /// Scores several methods from a shared prefill, their decode steps interleaved: each token is
    /// stepped by every method in turn (the order rotating by one each token), so that the methods'
    /// times per token share the machine's load alike, where one method's run after another's
    /// would meet a different load (the layers no method touches drifted by 3-5 ms per token
    /// between consecutive runs). Each method's indexes are built before the first step. A
    /// method's background refreshes run beside the others' steps too.
    public func score(methods: [DecoderAttentionOptions], from prefillState: PrefilledPrompt,
                      fidelity: Bool, progress: ((Int, Int) -> Void)? = nil) throws -> [PerplexityReport] {
        var runs: [MethodRun] = []
        defer { for run in runs { run.sequence.close() } }  // also those made before one that failed
        for options in methods { runs.append(try MethodRun(model: model, options: options, from: prefillState, fidelity: fidelity)) }
        for t in 0..<scored {
            let target = Int(ids[prefill + t])
            for run in runs { run.score(target: target) }
            progress?(t + 1, scored)
            guard t + 1 < scored else { break }
            for i in 0..<runs.count { try runs[(t + i) % runs.count].step(ids[prefill + t]) }
        }
        return try runs.map { run in
            let mean = run.nll / Double(scored)
            let c = run.sequence.session.configuration
            var refreshes = 0
            for l in 0..<c.layers { for h in 0..<c.kvHeads { refreshes += try run.sequence.session.refreshStatus(layer: l, head: h)?.refreshes ?? 0 } }
            var report = PerplexityReport(method: run.options.method.rawValue, prefillTokens: prefill, scoredTokens: scored,
                                          perplexity: exp(mean), top1Accuracy: Double(run.correct) / Double(scored), meanNLL: mean,
                                          prefillSeconds: prefillState.seconds, indexBuildSeconds: run.buildSeconds,
                                          decodeMsPerToken: scored > 1 ? Double(run.stepNanos) / 1e6 / Double(scored - 1) : 0,
                                          globalAttentionMsPerToken: scored > 1 ? Double(run.sequence.globalAttentionNanos) / 1e6 / Double(scored - 1) : 0,
                                          fidelity: run.tracker?.result, heads: run.heads)
            report.headsAfter = run.sequence.report()
            report.refreshes = refreshes
            return report
        }
    }
}

/// One method's teacher-forced run: its sequence restored from the prefill, indexes built, and the
/// sums its report needs.
private final class MethodRun {
    let options: DecoderAttentionOptions
    let sequence: Gemma3Sequence
    let buildSeconds: Double
    let heads: [String]
    let tracker: FidelityTracker?
    var logits: [Float]
    var nll = 0.0, correct = 0
    var stepNanos: UInt64 = 0

    init(model: Gemma3Model, options: DecoderAttentionOptions, from prefillState: PrefilledPrompt, fidelity: Bool) throws {
        self.options = options
        sequence = try Gemma3Sequence(model: model, options: options, restoring: prefillState.state)
        do {
            let buildStart = monotonicNanos()
            try sequence.buildIndexes()
            buildSeconds = seconds(since: buildStart)
        } catch {
            sequence.close()
            throw error
        }
        heads = sequence.report()
        if fidelity {
            let t = FidelityTracker(session: sequence.session)
            sequence.decodeObserver = { layer, queries, _ in try t.observe(layer: layer, queries: queries) }
            tracker = t
        } else {
            tracker = nil
        }
        logits = prefillState.logits
    }

    /// Adds the current logits' loss for `target`.
    func score(target: Int) {
        let r = negativeLogLikelihood(logits[...], target: target)
        nll += r.nll
        if r.top1 { correct += 1 }
    }

    /// One decode step of `token`, timed.
    func step(_ token: Int32) throws {
        let start = monotonicNanos()
        logits = try sequence.step(token)
        stepNanos += monotonicNanos() - start
    }
}

/// Measures each decode step's global attention against exact attention on the session's keys.
final class FidelityTracker {
    let session: KVSession
    private(set) var result = AttentionFidelity()

    init(session: KVSession) { self.session = session }

    func observe(layer: Int, queries: [Float]) throws {
        let c = session.configuration
        let groupWidth = c.queryHeadsPerKV * c.headDimension
        for head in 0..<c.kvHeads {
            let group = Array(queries[(head * groupWidth)..<((head + 1) * groupWidth)])
            try group.withUnsafeBufferPointer { qp in
                let detailed = try session.attendDetailed(layer: layer, head: head, queries: qp)
                let id = HeadID(context: c.context, layer: UInt16(layer), head: UInt16(head))
                try session.store.read { snapshot in
                    let keys = try snapshot.vectors(id, .keys), values = try snapshot.vectors(id, .values)
                    let f = Attention.fidelity(of: detailed, queries: qp, keys: keys, values: values, parameters: session.parameters)
                    let n = Double(result.samples)
                    result.recall = (result.recall * n + f.recall) / (n + 1)
                    result.attentionMass = (result.attentionMass * n + f.attentionMass) / (n + 1)
                    result.outputError = (result.outputError * n + f.outputError) / (n + 1)
                    result.keysScannedFraction = (result.keysScannedFraction * n + detailed.stats.keysScannedFraction) / (n + 1)
                    result.samples += 1
                }
            }
        }
    }
}
