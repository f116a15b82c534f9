import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

/// How the quantized tier codes a head (`kvrecall codes`, and what a session keeps).
struct CodeFormatOptions: ParsableArguments {
    @Option(help: "Bits per key code: 4 or 8.")
    var keyBits: Int = CodeFormat().keyBits
    @Option(help: "Bits per value code: 4 or 8.")
    var valueBits: Int = CodeFormat().valueBits
    @Option(help: "Positions per code group (keys and values are coded per channel within a group; 64 is the scan's fast path); even, dividing the block size (256).")
    var codeGroup: Int = CodeFormat().group

    var format: CodeFormat {
        CodeFormat(keyBits: keyBits, valueBits: valueBits, group: codeGroup)
    }
}

/// `kvrecall codes`: gives heads their quantized tier (what the `quantized` method scans).
struct Codes: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Code a head's keys and values for the quantized tier (the quantized method reads them).",
        usage: "kvrecall codes --store <dir> [<options>]",
        discussion: """
        Every complete group of positions gets low-bit codes of its keys and
        values (per channel within the group) and its mean value, stored
        beside the vectors; later ingests keep them current.
        A store written before the tier gets its codes here (a session keeps
        them from its first token). Recoding with another format replaces them.
        Heads coded before 4-bit codes were laid out in blocks keep their older
        order, which still works but scans slower (`kvrecall info` names it):
        recoding them lays them out in blocks (and marks the store format 2,
        which builds before blocks refuse to open).

        Example:
          kvrecall codes --store s --layer 5
          kvrecall codes --store s --all --key-bits 8
        """
    )

    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var headOptions: HeadOptions
    @Flag(help: "Every head of the store (instead of --context/--layer/--head).")
    var all = false
    @OptionGroup var format: CodeFormatOptions

    func run() throws {
        let store = try storeOptions.open()
        defer { store.close() }
        let heads = all ? try store.heads().map(\.id) : [headOptions.id]
        for id in heads {
            let lock = try store.lockHeads([id])
            defer { lock.release() }
            let start = monotonicNanos()
            try store.buildCodes(id, format: format.format)
            let info = try store.info(id)
            let perPosition = format.format.bytesPerPosition(dimension: info.dimension)
            print("head \(id): \(info.codedGroups) groups of \(format.format.group) coded (\(format.format)); \(fmt(perPosition, 0)) bytes per position, \(fmt(perPosition / Double(2 * info.bytesPerVector), 3))x the stored keys and values; \(fmt(Double(monotonicNanos() - start) / 1e9, 2)) s")
        }
    }
}

/// The `quantized` method's knobs (`attend`, `bench attention`).
struct QuantizedOptions: ParsableArguments {
    @Option(help: "quantized: positions per query head taken from the code scan and attended exactly.")
    var candidates: Int = QuantizedParameters().candidates
    @Option(help: "quantized: a group of positions is attended through each position's value codes when a head gives it at least this multiple of its mean tail mass per group, else through its mean value (0: every group through its codes).")
    var tailDetail: Float = QuantizedParameters().tailDetail
    @Flag(help: "quantized: drop the positions outside the candidates instead of attending them through their codes.")
    var noTail = false

    func apply(to p: inout AttentionParameters) {
        p.quantized.candidates = candidates
        p.quantized.tailDetail = tailDetail
        p.quantized.tail = !noTail
    }
}

