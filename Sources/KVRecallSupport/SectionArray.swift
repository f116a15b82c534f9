/// The elements of one array of a stored index section: either owned, or a read-only view of
/// the bytes the section was read from (zero-copy, as usearch's `view()`). A view read from the
/// store's memory map is valid while a read transaction of the same generation is open (the
/// pages are reachable from the last commit, so no writer can reuse them), like a `VectorView`.
/// Any mutation first copies a view into owned storage (copy-on-write), so an index loaded as a
/// view can still grow.
public struct SectionArray<Element: BitwiseCopyable>: RandomAccessCollection, MutableCollection {
    @usableFromInline
    enum Storage {
        case owned([Element])
        /// Elements in memory this array does not own; `owner` (if any) keeps them alive.
        case view(UnsafeBufferPointer<Element>, owner: AnyObject?)
    }

    @usableFromInline var storage: Storage

    public init() { storage = .owned([]) }
    public init(_ elements: [Element]) { storage = .owned(elements) }
    public init(repeating value: Element, count: Int) { storage = .owned([Element](repeating: value, count: count)) }

    /// A view of `elements`, kept alive by `owner` (nil: by the caller's read transaction).
    public init(view elements: UnsafeBufferPointer<Element>, owner: AnyObject?) {
        storage = .view(elements, owner: owner)
    }

    /// True while the elements are a view of bytes this array does not own.
    public var isView: Bool {
        if case .view = storage { return true }
        return false
    }

    public var startIndex: Int { 0 }
    @inlinable public var endIndex: Int {
        switch storage {
        case .owned(let a): return a.count
        case .view(let b, _): return b.count
        }
    }

    @inlinable public subscript(i: Int) -> Element {
        get {
            switch storage {
            case .owned(let a): return a[i]
            case .view(let b, _):
                precondition(i >= 0 && i < b.count, "SectionArray index out of range")
                return b[i]
            }
        }
        set { mutate { $0[i] = newValue } }
    }

    @inlinable
    public func withUnsafeBufferPointer<R>(_ body: (UnsafeBufferPointer<Element>) throws -> R) rethrows -> R {
        switch storage {
        case .owned(let a): return try a.withUnsafeBufferPointer(body)
        case .view(let b, let owner): return try withExtendedLifetime(owner) { try body(b) }
        }
    }

    public func withContiguousStorageIfAvailable<R>(_ body: (UnsafeBufferPointer<Element>) throws -> R) rethrows -> R? {
        try withUnsafeBufferPointer(body)
    }

    /// The viewed elements and their owner, nil when owned (for a buffer adopting the view).
    package var view: (elements: UnsafeBufferPointer<Element>, owner: AnyObject?)? {
        if case .view(let b, let owner) = storage { return (b, owner) }
        return nil
    }

    /// Mutable access to the elements, copying a view into owned storage first.
    public mutating func withUnsafeMutableBufferPointer<R>(_ body: (inout UnsafeMutableBufferPointer<Element>) throws -> R) rethrows -> R {
        try mutate { try $0.withUnsafeMutableBufferPointer(body) }
    }

    public mutating func append(_ element: Element) { mutate { $0.append(element) } }
    public mutating func append<S: Sequence>(contentsOf elements: S) where S.Element == Element {
        mutate { $0.append(contentsOf: elements) }
    }
    public mutating func removeAll() { storage = .owned([]) }

    /// The elements as an array (a copy of a view; the owned array itself otherwise).
    public var array: [Element] {
        switch storage {
        case .owned(let a): return a
        case .view(let b, let owner): return withExtendedLifetime(owner) { Array(b) }
        }
    }

    /// Copies a view into owned storage (no-op when already owned).
    @usableFromInline mutating func makeOwned() {
        if case .view(let b, let owner) = storage { storage = .owned(withExtendedLifetime(owner) { Array(b) }) }
    }

    /// Runs `body` on the owned array without a second reference to it (so it is mutated in place).
    @usableFromInline mutating func mutate<R>(_ body: (inout [Element]) throws -> R) rethrows -> R {
        makeOwned()
        guard case .owned(var a) = storage else { fatalError("unreachable") }
        storage = .owned([])
        defer { storage = .owned(a) }
        return try body(&a)
    }
}

extension SectionArray: ExpressibleByArrayLiteral {
    public init(arrayLiteral elements: Element...) { self.init(elements) }
}

extension SectionArray: Equatable where Element: Equatable {
    public static func == (a: SectionArray, b: SectionArray) -> Bool {
        a.withUnsafeBufferPointer { x in b.withUnsafeBufferPointer { y in x.elementsEqual(y) } }
    }
}

extension SectionArray: @unchecked Sendable where Element: Sendable {}
