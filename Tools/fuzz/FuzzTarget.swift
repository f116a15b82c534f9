// libFuzzer entry point for the .npy and .safetensors parsers. Compiled together with
// Sources/KVRecall/Formats/*.swift by Tools/fuzz/run.sh (not by SwiftPM):
//   -D FUZZ_NPY          fuzz NPY.parse
//   -D FUZZ_SAFETENSORS  fuzz Safetensors.parse and every tensor(named:)
// An input must either parse or throw a FormatError; anything else (a trap, an out-of-bounds
// access caught by AddressSanitizer, a leak) is a finding.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    #if FUZZ_NPY
    do {
        let tensor = try NPY.parse(bytes, path: "fuzz.npy")
        _ = tensor.floats()
        _ = tensor.firstNonFinite()
        // Whatever parses must re-encode to something that parses to the same tensor.
        let again = try NPY.parse(try NPY.encode(tensor), path: "fuzz.npy")
        precondition(again == tensor, "NPY round trip changed the tensor")
    } catch is FormatError {
    } catch {
        preconditionFailure("not a FormatError: \(error)")
    }
    #elseif FUZZ_SAFETENSORS
    do {
        let file = try Safetensors.parse(bytes, path: "fuzz.safetensors")
        var tensors: [Tensor] = []
        for name in file.names() {
            do {
                let tensor = try file.tensor(named: name)
                _ = tensor.floats()
                _ = tensor.firstNonFinite()
                tensors.append(tensor)
            } catch is FormatError {}
        }
        if tensors.count == file.entries.count, !tensors.isEmpty {
            let again = try Safetensors.parse(try Safetensors.encode(tensors: tensors, metadata: file.metadata), path: "fuzz.safetensors")
            for tensor in tensors {
                let back = try again.tensor(named: tensor.name)
                precondition(back == tensor, "safetensors round trip changed a tensor")
            }
        }
    } catch is FormatError {
    } catch {
        preconditionFailure("not a FormatError: \(error)")
    }
    #else
    #error("compile with -D FUZZ_NPY or -D FUZZ_SAFETENSORS")
    #endif
    return 0
}
