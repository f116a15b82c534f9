/// A kernel called with arguments it cannot work with (shapes, counts, settings). Layers above
/// check their own settings first, so users see their errors; this one names the kernel's.
public struct KernelError: Error, CustomStringConvertible, Equatable, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
