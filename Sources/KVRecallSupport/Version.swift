/// The library's version, as `kvrecall_version()` and the Python package report it.
public enum KVRecallVersion {
    public static let string = "0.2.0"
    /// The C ABI version `include/kvrecall.h` describes (`KVRECALL_ABI_VERSION`).
    public static let abi = 2
}
